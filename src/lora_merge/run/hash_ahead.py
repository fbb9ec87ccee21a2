"""Start hashing a merge's local input files before torch is imported.

The model card records the sha256 of every input file: at about 1.5 GB/s per
core, 1.5 CPU-s for a 1.1B model and 9 for a 7B one. ``import torch`` takes
1.5 s on one core while the others wait, and hashlib lets go of the GIL, so
hashing that starts before the import costs no wall time there (measured in
docs/benchmarks.md), and what is left of it overlaps the merge as before.

Which files a run reads is decided later, by the inputs' resolution; here only
JSON is read, to guess them: BASE's ``config.json``, its index and the shards it
names (or ``model.safetensors``), each ADAPTER folder's ``adapter_config.json``
and ``adapter_model.safetensors``. A guess that turns out wrong costs CPU time
only: the run asks :class:`~lora_merge.io.hashing.FileHashes` for each file it
really read, and a file not hashed ahead (or changed since) is hashed then.
Files whose sha256 is known without reading them
(:func:`lora_merge.io.known_digests.known_sha256`) are not hashed ahead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from lora_merge.errors import UsageError
from lora_merge.io.cpus import usable_cpu_count
from lora_merge.io.hashing import FileHashes
from lora_merge.io.hub_names import CONFIG_NAME, SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from lora_merge.io.known_digests import DigestCache, known_sha256
from lora_merge.options.settings import MergeOptions
from lora_merge.options.values import SaveMethod

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Files hashed at once, at most: each thread maps one window (see io/hashing.py).
MAX_HASH_THREADS = 4


def hash_inputs_ahead(options: MergeOptions) -> FileHashes | None:
    """Start hashing the local files a merge with ``options`` will record in its model card.

    Returns:
        The hashes being computed, to hand to :func:`lora_merge.api.merge`, or None
        when the run records no hashes (``--no-hash-inputs``, ``--save-method lora``,
        ``--part``) or has no local input folder. Options are not checked here:
        a mistake is reported by the run itself.
    """
    try:
        writes_card = SaveMethod.parse(options.save_method, "--save-method") != SaveMethod.LORA
    except UsageError:
        return None
    if not options.hash_inputs or not writes_card or options.part is not None:
        return None
    cache = DigestCache.open(time.time_ns())
    paths = [
        path
        for path in local_input_files(options.base, options.adapters)
        if known_sha256(path, cache) is None
    ]
    if not paths:
        return None
    # The cores the import (one) leaves free, each on a file of its own.
    workers = min(MAX_HASH_THREADS, len(paths), max(1, usable_cpu_count() - 1))
    return FileHashes(paths, workers)


def local_input_files(base: Path | str, adapters: Sequence[Path | str]) -> list[Path]:
    """BASE's and each ADAPTER folder's files a merge reads, the largest first, as far as
    JSON alone tells (Hub ids and loralib files give none)."""
    files: list[Path] = []
    folder = Path(base).expanduser()
    if folder.is_dir():
        files += [folder / name for name in (CONFIG_NAME, SAFETENSORS_INDEX_FILE)]
        files += [folder / name for name in _shard_names(folder)]
    for adapter in adapters:
        adapter_folder = Path(adapter).expanduser()
        if adapter_folder.is_dir():
            files += [adapter_folder / name for name in ADAPTER_FILES]
    existing = [path for path in files if path.is_file()]
    # Largest first: the threads finish together instead of one hashing the last big shard.
    return sorted(existing, key=lambda path: path.stat().st_size, reverse=True)


def _shard_names(folder: Path) -> list[str]:
    """The shards BASE's index names, or the single file; none where the index cannot be read."""
    index = folder / SAFETENSORS_INDEX_FILE
    if not index.is_file():
        return [SAFETENSORS_SINGLE_FILE]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        names = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return []
    # Only files inside BASE: the run refuses an index that names others.
    return [name for name in names if Path(name).name == name]
