"""llama.cpp's own GGUF converter, taken from a released llama.cpp source package, unpacked.

The tests convert lora-merge's output with the converter users run
(``convert_hf_to_gguf.py``, its ``conversion`` package and the ``gguf`` package
of the same release, ``gguf-py``). It comes from the llama-cpp-python source
distribution on PyPI, which vendors a released llama.cpp: nothing is built, only
three paths are unpacked. ``make install`` runs this file once::

    python tests/support/llama_cpp.py fetch .cache/llama.cpp

(``pip download`` of the pinned sdist, then the unpack). The tests never
download: they find the converter in ``.cache/llama.cpp`` or in
``$LLAMA_CPP_DIR`` (a llama.cpp checkout of your own), or say why they skip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The llama-cpp-python release whose vendored llama.cpp the tests use. Its converter
# runs with transformers 5.x and the torch pinned in the Makefile (checked by the tests).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / ".cache" / "llama.cpp"
# What the converter needs of a llama.cpp tree, relative to its root.
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
VENDORED = "vendor/llama.cpp/"


def converter_dir() -> Path:
    """Where the converter is looked for: ``$LLAMA_CPP_DIR``, else ``.cache/llama.cpp``."""
    return Path(os.environ.get("LLAMA_CPP_DIR") or DEFAULT_DIR)


def missing_paths(root: Path) -> list[str]:
    """The converter's paths that ``root`` lacks."""
    return [name for name in CONVERTER_PATHS if not (root / name).exists()]


def converter_missing(root: Path) -> str | None:
    """Why the converter cannot run from ``root``, or None when it can."""
    missing = missing_paths(root)
    if missing:
        return (
            f"llama.cpp's converter is not in {root} (missing {', '.join(missing)}); "
            "`make install` unpacks it there from the llama-cpp-python sdist on PyPI, or "
            "set LLAMA_CPP_DIR to a llama.cpp checkout"
        )
    try:
        import sentencepiece  # noqa: F401  (the converter imports it for every Llama vocabulary)
    except ImportError:
        return "the converter needs sentencepiece (the `test` extra installs it)"
    return None


def unpack(sdist: Path, destination: Path) -> None:
    """Unpack the converter's paths from llama-cpp-python's sdist into ``destination``.

    Members are checked to stay inside ``destination`` (``tarfile``'s data filter
    where this Python has it, and a path check everywhere).
    """
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=destination.parent))
    try:
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                _, _, inside = member.name.partition("/")
                if not inside.startswith(VENDORED):
                    continue
                relative = inside.removeprefix(VENDORED)
                if not relative.startswith(CONVERTER_PATHS) or not (
                    member.isfile() or member.isdir()
                ):
                    continue
                target = (staging / relative).resolve()
                if not target.is_relative_to(staging.resolve()):
                    raise ValueError(f"{sdist}: member {member.name} leaves the destination")
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # a regular file
                with source, open(target, "wb") as written:
                    shutil.copyfileobj(source, written)
        missing = missing_paths(staging)
        if missing:
            raise ValueError(f"{sdist} holds no {', '.join(missing)} under {VENDORED}")
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(destination: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> None:
    """Download llama-cpp-python's sdist with pip (no build, no dependencies) and unpack it.

    ``--no-build-isolation``: pip reads the sdist's metadata with the build backend
    installed in this environment (scikit-build-core, in the ``test`` extra) instead
    of installing a fresh one, and builds nothing.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--no-binary", ":all:", "--no-build-isolation", "--dest", download,
                f"llama-cpp-python=={version}",
            ],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(download).glob("llama_cpp_python-*.tar.gz")
        unpack(sdist, destination)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetching = commands.add_parser("fetch", help="pip download the sdist, then unpack it")
    fetching.add_argument("destination", type=Path, nargs="?", default=DEFAULT_DIR)
    fetching.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION)
    unpacking = commands.add_parser("unpack", help="unpack an sdist you already have")
    unpacking.add_argument("sdist", type=Path)
    unpacking.add_argument("destination", type=Path, nargs="?", default=DEFAULT_DIR)
    arguments = parser.parse_args()
    if arguments.command == "fetch":
        fetch(arguments.destination, arguments.version)
    else:
        unpack(arguments.sdist, arguments.destination)


if __name__ == "__main__":
    main()
