"""Start-up: what each kind of run imports, as Python itself reports it.

``--version``, ``--help`` and a mistyped option must answer without importing
torch (about 1.7 s), huggingface_hub (0.3 s), tqdm or bitsandbytes; a merge of
local folders never imports huggingface_hub, and a 16-bit one never bitsandbytes.
The oracle is the interpreter's own ``-X importtime`` trace of a fresh process
(one line per module it imported), never a timing: these tests hold on a loaded
machine as on an idle one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from handmade_checkpoints import write_adapter, write_base
from huggingface_hub import constants

from lora_merge.errors import EXIT_USAGE
from lora_merge.io import hub_names

HEAVY = ("torch", "huggingface_hub", "tqdm", "bitsandbytes", "numpy", "safetensors")


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules named by ``-X importtime`` lines: ``import time: self | cumulative | name``."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name)
    return names


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def run_traced(
    *arguments: str, code: str | None = None
) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -m lora_merge ARGUMENTS`` (or ``python -c CODE``) with ``-X importtime``.

    Returns:
        The finished process (its stderr without the trace) and every top-level
        package it imported.
    """
    command = [sys.executable, "-X", "importtime"]
    command += ["-c", code] if code is not None else ["-m", "lora_merge", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    packages = top_level(imported_modules(result.stderr))
    assert "lora_merge" in packages, (
        "the trace did not record lora_merge: is -X importtime honoured?"
    )
    other_lines = [
        line for line in result.stderr.splitlines() if not line.startswith("import time:")
    ]
    result.stderr = "\n".join(other_lines)
    return result, packages


def test_version_imports_nothing_heavy() -> None:
    result, packages = run_traced("--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lora-merge ")
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


def test_help_is_complete_and_imports_nothing_heavy() -> None:
    result, packages = run_traced("--help")

    assert result.returncode == 0, result.stderr
    # Every panel, option and the exit-code epilog are still there (test_cli_shape checks
    # them one by one); a few spot checks that the help is the full one.
    for text in ("--max-memory", "--push-to-hub", "--combine", "Exit codes:", "Hub"):
        assert text in result.stdout
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


def test_mistyped_option_fails_with_usage_code_and_imports_nothing_heavy(tmp_path: Path) -> None:
    result, packages = run_traced("base", "adapter", str(tmp_path / "out"), "--no-such-option")

    assert result.returncode == EXIT_USAGE
    assert "--no-such-option" in result.stderr
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))
    assert not (tmp_path / "out").exists()


def test_import_lora_merge_defers_torch_until_merge_is_looked_up() -> None:
    code = (
        "import sys\n"
        "import lora_merge\n"
        "from lora_merge import MergeOptions, LoraMergeError\n"
        "assert 'torch' not in sys.modules, 'import lora_merge imported torch'\n"
        "from lora_merge import merge, MergeSummary\n"
        "import lora_merge.api\n"
        "assert merge is lora_merge.api.merge and MergeSummary is lora_merge.api.MergeSummary\n"
        "assert 'torch' in sys.modules\n"
        "assert {'merge', 'MergeSummary', '__version__'} <= set(dir(lora_merge))\n"
        "from importlib.metadata import version\n"
        "from lora_merge import __version__\n"
        "assert __version__ == lora_merge.__version__ == version('lora-merge'), __version__\n"
    )
    result, packages = run_traced(code=code)

    assert result.returncode == 0, result.stderr
    assert "torch" in packages


def test_unknown_attribute_of_the_package_is_an_attribute_error() -> None:
    import lora_merge

    with pytest.raises(AttributeError, match="no_such_name"):
        lora_merge.no_such_name  # noqa: B018


def test_local_16bit_merge_imports_no_huggingface_hub_nor_bitsandbytes(tmp_path: Path) -> None:
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    out = tmp_path / "merged"

    result, packages = run_traced(
        str(tmp_path / "base"), str(tmp_path / "adapter"), str(out), "--quiet"
    )

    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    assert "torch" in packages  # the trace saw the merge itself
    assert "huggingface_hub" not in packages
    assert "bitsandbytes" not in packages


def test_written_out_file_names_are_huggingface_hubs() -> None:
    for name in (
        "CONFIG_NAME",
        "REPOCARD_NAME",
        "SAFETENSORS_INDEX_FILE",
        "SAFETENSORS_SINGLE_FILE",
        "SAFETENSORS_MAX_HEADER_LENGTH",
    ):
        assert getattr(hub_names, name) == getattr(constants, name), name
