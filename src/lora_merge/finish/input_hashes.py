"""Which input files a merge reads, and their sha256, computed beside the merge for OUT's model card.

:func:`files_read_by_merge` lists them (configs, index, weights, named relative
to their folder); :func:`start_hashing` hashes them on a background thread while
the merge runs, and the model card (:mod:`lora_merge.finish.provenance`) lists
the result.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.hashing import sha256_of
from lora_merge.io.hub_names import CONFIG_NAME, SAFETENSORS_INDEX_FILE

# The cache names a file's blob by its etag, which for files stored with Git LFS
# (every weights file) is the sha256 of the content: no need to read it again.
_SHA256_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class InputFile:
    """One file read by the merge, with its size and sha256 (None when not computed)."""

    role: str
    name: str
    size: int
    sha256: str | None


def input_files(role: str, folder: Path, paths: Iterable[Path]) -> list[tuple[str, str, Path]]:
    """``(role, name relative to the input folder, path)`` for each distinct input file."""
    seen: dict[Path, None] = dict.fromkeys(paths)
    return [(role, _relative_name(path, folder), path) for path in seen]


def start_hashing(
    files: Sequence[tuple[str, str, Path]],
    enabled: bool,
    known: Mapping[Path, tuple[int, str | None]] | None = None,
) -> Future[list[InputFile]]:
    """Hash the input files on a background thread while the merge runs.

    The thread reads files the merge reads too (mostly from the page cache) and
    hashlib releases the GIL, so on a machine with a spare core this costs little
    wall time. Files in huggingface_hub's cache are not read at all: their blob's
    name is their sha256. Files in ``known`` (size and sha256 by path: shards read
    from the Hub with ``--low-disk``, whose sha256 the Hub gave) are not read either.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-merge-hash")
    future = pool.submit(_hash_all, files, enabled, known or {})
    pool.shutdown(wait=False)
    return future


def files_read_by_merge(
    base: BaseCheckpoint, adapter_folders: Sequence[AdapterFolder]
) -> list[tuple[str, str, Path]]:
    """Every file the merge reads, for the model card: configs, index, weights
    (several adapters' files are listed as ``adapter 1``, ``adapter 2``...)."""
    base_files = [
        base.folder / name
        for name in (CONFIG_NAME, SAFETENSORS_INDEX_FILE)
        if (base.folder / name).is_file()
    ]
    base_files += sorted({entry.path for entry in base.entries.values()})
    files = input_files("base", base.folder, base_files)
    for number, folder in enumerate(adapter_folders, start=1):
        role = "adapter" if len(adapter_folders) == 1 else f"adapter {number}"
        paths = [path for path in (folder.config_path, folder.weights_path) if path]
        files += input_files(role, folder.folder, paths)
    return files


def _hash_all(
    files: Sequence[tuple[str, str, Path]],
    enabled: bool,
    known: Mapping[Path, tuple[int, str | None]],
) -> list[InputFile]:
    hashed = []
    for role, name, path in files:
        if path in known:
            size, sha256 = known[path]
            hashed.append(InputFile(role, name, size, sha256 if enabled else None))
        else:
            hashed.append(
                InputFile(role, name, path.stat().st_size, _sha256(path) if enabled else None)
            )
    return hashed


def _sha256(path: Path) -> str:
    blob = Path(os.path.realpath(path))
    if blob.parent.name == "blobs" and _SHA256_BLOB_NAME.fullmatch(blob.name):
        return blob.name
    return sha256_of(path)


def _relative_name(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name
