"""Which input files a merge reads, and their sha256, computed beside the merge for OUT's model card.

:func:`files_read_by_merge` lists them (configs, index, weights, named relative
to their folder); :func:`start_hashing` hashes them on a background thread while
the merge runs, and the model card (:mod:`lora_merge.finish.provenance`) lists
the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.hashing import FileHashes, sha256_of
from lora_merge.io.hub_names import CONFIG_NAME, SAFETENSORS_INDEX_FILE
from lora_merge.io.known_digests import DigestCache, known_sha256


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
    ahead: FileHashes | None = None,
) -> Future[list[InputFile]]:
    """Hash the input files on a background thread while the merge runs.

    The thread reads files the merge reads too (mostly from the page cache) and
    hashlib releases the GIL, so on a machine with a spare core this costs little
    wall time. Files whose sha256 is known already are not read at all (see
    :mod:`lora_merge.io.known_digests`: huggingface_hub's cache and ``--local-dir``
    records, and the digests of this user's earlier runs, where the digests computed
    now are stored in turn). Files in ``known`` (size and sha256 by path: shards read
    from the Hub with ``--low-disk``, whose sha256 the Hub gave) are not read either.
    Files that ``ahead`` started hashing before the run (see
    :func:`lora_merge.run.hash_ahead.hash_inputs_ahead`) are taken from it.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-merge-hash")
    future = pool.submit(_hash_all, files, enabled, known or {}, ahead)
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
    ahead: FileHashes | None,
) -> list[InputFile]:
    # Before any of this run's hashing began: the reference of the cache's rule on files
    # written just before they were hashed.
    started_ns = ahead.started_ns if ahead is not None else time.time_ns()
    cache = DigestCache.open(started_ns) if enabled else None
    hashed = []
    for role, name, path in files:
        if path in known:
            size, sha256 = known[path]
            hashed.append(InputFile(role, name, size, sha256 if enabled else None))
        else:
            hashed.append(
                InputFile(
                    role,
                    name,
                    path.stat().st_size,
                    _sha256(path, ahead, cache) if enabled else None,
                )
            )
    if cache is not None:
        cache.save()
    return hashed


def _sha256(path: Path, ahead: FileHashes | None, cache: DigestCache | None) -> str:
    known = known_sha256(path, cache)
    if known is not None:
        return known
    before = os.stat(path)
    digest = sha256_of(path) if ahead is None else ahead.sha256(path)
    if cache is not None:
        cache.remember(path, before, digest)
    return digest


def _relative_name(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name
