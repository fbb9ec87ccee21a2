"""The run, third step: stream the planned tensors into shards.

Each shard's tensors are read from the base (dequantized on the way when the
base is quantized, by range requests when it is on the Hub), merged with the
adapter and written (``stream/``); a shard already journaled by an earlier run
or a part is kept. :mod:`lora_merge.run.folder` calls :func:`write_shards`
inside OUT's staging folder.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from lora_merge._version import __version__
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.finish.shard_sink import KeepShards
from lora_merge.finish.staging import StagingFolder
from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.dequantizing_reader import DequantizingReader
from lora_merge.io.http_reader import RangedTensorReader
from lora_merge.io.read_pacing import ReadPacing
from lora_merge.io.reader import SafetensorsReader, StoredTensorSource, TensorSource
from lora_merge.io.shard_writer import encode_safetensors_header
from lora_merge.io.training_quantization_reader import TrainingQuantizationReader
from lora_merge.options import MergeSettings
from lora_merge.plan.fingerprint import merge_fingerprint
from lora_merge.plan.model import MergePlan, PlannedTensor
from lora_merge.run.copy_ahead import CopiedRange, CopiesAhead
from lora_merge.stream.executor import write_shard

if TYPE_CHECKING:  # imported for a --low-disk run only
    from lora_merge.finish.hub_upload import ShardUploads

Shards = list[tuple[str, list[PlannedTensor]]]


class ShardStream(NamedTuple):
    """What :func:`write_shard` needs besides the shard: the sources and how to stream."""

    base_reader: StoredTensorSource
    adapter: TensorSource
    settings: MergeSettings
    tile_budget: int
    on_bytes: Callable[[int], None]
    metadata: dict[str, str]
    copies_ahead: CopiesAhead | None = None


def write_shards(
    staging: StagingFolder, shards: Shards, stream: ShardStream, uploads: KeepShards | ShardUploads
) -> int:
    """Write each shard into ``staging``, journal it and hand it to ``uploads``.

    Shards already uploaded (``--low-disk --resume``), or verified in the staging
    folder (``--resume``, or the parts' shards in the final step), are kept.

    Returns:
        How many shards were kept from an earlier run (or from the parts).
    """
    kept = 0
    for file_name, tensors in shards:
        if uploads.has_shard(file_name) or staging.has_verified_shard(file_name):
            kept += 1
            stream.on_bytes(shard_bytes(tensors))
            continue
        path = staging.shard_path(file_name)
        written = copied_ahead(stream, file_name, tensors)
        _write_shard(path, tensors, stream, written)
        if written and stream.copies_ahead and not stream.copies_ahead.settle(file_name):
            # A copy ahead failed (the disk?): the shard again, whole, reporting the error;
            # its bytes were counted once.
            _write_shard(path, tensors, stream._replace(on_bytes=lambda _: None))
        staging.record_shard(file_name)
        uploads.shard_written(staging.path / file_name)
    if stream.copies_ahead is not None:
        stream.copies_ahead.discard_unclaimed()
    uploads.wait()
    return kept


def _write_shard(
    path: Path, tensors: list[PlannedTensor], stream: ShardStream, written: Collection[str] = ()
) -> None:
    settings = stream.settings
    write_shard(
        path,
        tensors,
        stream.base_reader,
        stream.adapter,
        settings.device,
        stream.tile_budget,
        stream.on_bytes,
        settings.allow_nonfinite,
        stream.metadata,
        settings.threads,
        written,
    )


def copied_ahead(stream: ShardStream, file_name: str, tensors: list[PlannedTensor]) -> set[str]:
    """The tensors of a shard whose bytes are copied since before torch was imported, exactly
    as this run's plan copies them (see :mod:`lora_merge.run.copy_ahead`).

    A tensor counts only when the shard's header is the one planned ahead, the plan copies it
    byte for byte, and the very bytes it copies (file, offset, length) are those copied.
    """
    if stream.copies_ahead is None:
        return set()
    header = encode_safetensors_header([t.spec for t in tensors], stream.metadata)
    byte_copies = {}
    for tensor in tensors:
        if tensor.is_byte_copy:
            entry = stream.base_reader.entry(tensor.source_key)
            byte_copies[tensor.spec.name] = CopiedRange(
                entry.path.resolve(), entry.start, entry.nbytes
            )
    return stream.copies_ahead.claim(file_name, header, byte_copies)


def resume_fingerprint(
    shards: Shards,
    base: BaseCheckpoint,
    adapter_folders: Sequence[AdapterFolder],
    recipe: CombineRecipe | None,
    by_content: bool = False,
) -> str:
    """The digest a ``--resume`` run's journal must carry for its shards to be kept.

    Shards read from the Hub (``--low-disk``) count by URL (pinned to a commit),
    size and sha256 instead of a local file's size and mtime; with ``by_content``
    (``--low-disk``, whose parts may run on other machines) local files count by
    name, size and sha256.
    """
    inputs = [entry.path for entry in base.entries.values() if entry.path not in base.remote]
    for folder in adapter_folders:
        inputs += [path for path in (folder.config_path, folder.weights_path) if path]
    described = recipe.describe() if recipe else ""
    if base.remote:
        described += repr(sorted((f.url, f.size, f.sha256) for f in base.remote.values()))
    return merge_fingerprint(shards, inputs, __version__, described, by_content)


def shard_bytes(tensors: list[PlannedTensor]) -> int:
    return sum(t.spec.nbytes for t in tensors)


@contextmanager
def open_base(
    base: BaseCheckpoint, device: torch.device, plan: MergePlan, pacing: ReadPacing | None = None
) -> Iterator[StoredTensorSource]:
    """The base's reader: quantized weights come out dequantized (on ``device``), and
    with ``--qlora-base`` the planned weights as QLoRA training saw them.

    Shards on the Hub (``--low-disk``) are read by range requests. Local shards' reads
    are told to ``pacing`` (the input files' hashing follows them).
    """
    opened = RangedTensorReader(base.entries, base.remote) if base.remote else None
    as_trained = {t.source_key: t.as_trained for t in plan.tensors if t.as_trained}
    with opened or SafetensorsReader(base.entries, pacing) as stored:
        if as_trained:
            yield TrainingQuantizationReader(stored, as_trained)
        elif base.quantization is None:
            yield stored
        else:
            reader = DequantizingReader(stored, base.tensors, device)
            # Weights copied as stored are never decoded: their scales are checked here,
            # before anything is written, as decoding checks the others'.
            copied = {t.source_key for t in plan.tensors if t.is_byte_copy}
            weights = base.quantization.weights.values()
            reader.check_kept(w.name for w in weights if w.anchor in copied)
            yield reader
