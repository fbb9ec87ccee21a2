"""Start hashing a merge's local input files before torch is imported.

The model card records the sha256 of every input file: at about 1.5 GB/s per
core, 1.5 CPU-s for a 1.1B model and 9 for a 7B one. ``import torch`` takes
1.5 s on one core while the others wait, and hashlib lets go of the GIL, so
hashing that starts before the import costs no wall time there (measured in
docs/benchmarks.md), and what is left of it overlaps the merge as before.

So that the hashing reads from the disk as little as it can beyond what the
merge reads, whatever the model's size (docs/benchmarks.md, "Hashing within the
page cache"): the small files the run reads first (configs, the adapter's) are hashed first, then BASE's
shards in the order the merge reads them (the order its index first names them,
each from its start: :func:`lora_merge.inputs.resolve.resolve_base` keeps it),
never more than a lead of bytes ahead of the merge's reads
(:mod:`lora_merge.io.read_pacing`). Until the merge starts reading, that lead is
all the hasher may take. The run's readers report what they read
(``FileHashes.pacing``) and release the pacing once the shards are written.

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
from lora_merge.io.read_pacing import ReadPacing, hashing_lead_bytes
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
    # Only the shards hashed here follow the merge's reads (a known digest reads nothing).
    shards = [path for path in base_shards(options.base) if path in paths]
    shard_bytes = sum(path.stat().st_size for path in shards)
    pacing = ReadPacing(hashing_lead_bytes(shard_bytes), shards)
    return FileHashes(paths, workers, pacing)


def local_input_files(base: Path | str, adapters: Sequence[Path | str]) -> list[Path]:
    """BASE's and each ADAPTER folder's files a merge reads, as far as JSON alone tells
    (Hub ids and loralib files give none), in the order the merge reads them: the
    small files first, then BASE's shards (:func:`base_shards`)."""
    files: list[Path] = []
    folder = Path(base).expanduser()
    if folder.is_dir():
        files += [folder / name for name in (CONFIG_NAME, SAFETENSORS_INDEX_FILE)]
    for adapter in adapters:
        adapter_folder = Path(adapter).expanduser()
        if adapter_folder.is_dir():
            files += [adapter_folder / name for name in ADAPTER_FILES]
    files += base_shards(base)
    return [path for path in files if path.is_file()]


def base_shards(base: Path | str) -> list[Path]:
    """BASE's weight files, in the order the merge reads them (empty for a Hub id)."""
    folder = Path(base).expanduser()
    if not folder.is_dir():
        return []
    return [folder / name for name in _shard_names(folder)]


def _shard_names(folder: Path) -> list[str]:
    """The shards BASE's index names (in the order it first names them), or the single file;
    none where the index cannot be read."""
    index = folder / SAFETENSORS_INDEX_FILE
    if not index.is_file():
        return [SAFETENSORS_SINGLE_FILE]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        # In the order the index first names them: the order the run reads them in.
        names = list(dict.fromkeys(str(name) for name in weight_map.values()))
    except (OSError, ValueError, AttributeError):
        return []
    # Only files inside BASE: the run refuses an index that names others.
    return [name for name in names if Path(name).name == name]
