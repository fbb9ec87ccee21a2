"""The library's entry point, :func:`merge`: the flow, in order.

:func:`merge` prepares the merge (:mod:`lora_merge.prepare`: resolve inputs
from ``inputs/`` -> read the adapter from ``adapter/`` -> plan with ``plan/``),
streams the planned tensors into shards (``stream/``) inside a staging folder,
finishes OUT (``finish/``: index, config, tokenizer, model card, the rename
into place) and pushes it to the Hub when asked. :func:`preview_merge` (from
:mod:`lora_merge.preview`) prepares the same merge and describes it instead.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from lora_merge._version import __version__
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.errors import InvalidInputError, LoraMergeWarning, OutputError
from lora_merge.finish.adapter_output import write_normalized_adapter
from lora_merge.finish.disk import check_free_space
from lora_merge.finish.folder import (
    copy_side_files,
    merged_model_config,
    write_config,
    write_index,
)
from lora_merge.finish.parts import unproduced_note
from lora_merge.finish.progress import progress_bar as _progress_bar
from lora_merge.finish.provenance import (
    MergeRecord,
    files_read_by_merge,
    shard_metadata,
    start_hashing,
    write_model_card,
)
from lora_merge.finish.publish import push_folder
from lora_merge.finish.shard_sink import KeepShards
from lora_merge.finish.staging import StagingFolder
from lora_merge.finish.verify import verify_output
from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.dequantizing_reader import DequantizingReader
from lora_merge.io.hashing import FileHashes
from lora_merge.io.http_reader import RangedTensorReader
from lora_merge.io.reader import SafetensorsReader, StoredTensorSource, TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.options import MergeOptions, MergeSettings, checked_options
from lora_merge.plan.fingerprint import merge_fingerprint
from lora_merge.plan.model import MergePlan, PlannedTensor
from lora_merge.plan.requantize import requantized_config
from lora_merge.plan.shards import shard_layout
from lora_merge.prepare import RunSettings, prepare
from lora_merge.preview import MergePreview, preview_merge
from lora_merge.stream.executor import write_shard
from lora_merge.summary import MergeSummary

if TYPE_CHECKING:  # imported by _shard_uploads for a --low-disk run only
    from lora_merge.finish.hub_upload import ShardUploads

__all__ = ["MergePreview", "MergeSummary", "merge", "preview_merge"]

Shards = list[tuple[str, list[PlannedTensor]]]


class _Written(NamedTuple):
    """What :func:`_write_output` did: shards written or kept, and what to tell the user."""

    shards: Shards
    kept: int
    computed: int | None
    notes: list[str]


def merge(options: MergeOptions, hashes_ahead: FileHashes | None = None) -> MergeSummary:
    """Merge a LoRA adapter into its base model and write a standalone model folder.

    Args:
        options: what to merge, where to, and how.
        hashes_ahead: input files' sha256 started before this call (see
            :func:`lora_merge.hash_ahead.hash_inputs_ahead`); the model card takes
            them from there. None: the files are hashed during the run.

    Returns:
        A summary of the work done.

    Raises:
        UsageError: options that are invalid or contradict each other, raised
            before anything is read or written.
        LoraMergeError: for every problem with the inputs or OUT; nothing is
            written to OUT in that case and the inputs are never modified.
    """
    settings = checked_options(options)
    with _shard_uploads(settings) as uploads:
        summary = _merge_reporting_permissions(settings, uploads, hashes_ahead)
        if settings.push_to_hub is None:
            return summary
        if settings.low_disk:  # committed by ShardUploads before OUT appeared
            commit_url = uploads.commit_url
        else:
            commit_url = push_folder(
                Path(summary.out),
                settings.push_to_hub,
                private=settings.private,
                revision=settings.hub_revision,
                message=f"Upload model merged by lora-merge {__version__}",
                quiet=settings.quiet,
            )
    return replace(summary, pushed_to=settings.push_to_hub, commit_url=commit_url)


def _shard_uploads(settings: MergeSettings) -> KeepShards | ShardUploads:
    """Where finished shards go: OUT keeps them, or ``--low-disk`` uploads and deletes them."""
    if not settings.low_disk or settings.push_to_hub is None:
        return KeepShards()
    from lora_merge.finish.hub_upload import ShardUploads  # imports huggingface_hub

    return ShardUploads(
        settings.push_to_hub,
        revision=settings.hub_revision,
        private=settings.private,
        quiet=settings.quiet,
        part=settings.part,
        resume=settings.resume,
    )


def _merge_reporting_permissions(
    settings: MergeSettings, uploads: KeepShards | ShardUploads, hashes_ahead: FileHashes | None
) -> MergeSummary:
    """:func:`_merge`, with a permission problem turned into an error that names the path."""
    try:
        return _merge(settings, uploads, hashes_ahead)
    except PermissionError as err:
        # Whatever step met it, a permission problem is the user's to fix: name the path.
        path = Path(err.filename or "?")
        out_parent = Path(settings.out).expanduser().absolute().parent
        error = OutputError if path.is_relative_to(out_parent) else InvalidInputError
        raise error(
            f"cannot access {path}: permission denied; check the file's permissions"
        ) from err


def _merge(
    options: MergeSettings, uploads: KeepShards | ShardUploads, hashes_ahead: FileHashes | None
) -> MergeSummary:
    started = time.perf_counter()
    with prepare(options) as prepared:  # resolve inputs -> read adapter -> plan
        plan = prepared.plan
        planned = time.perf_counter()
        written_shards = _write_output(
            plan,
            prepared.base,
            prepared.adapter,
            prepared.adapter_folders,
            prepared.out,
            prepared.settings,
            prepared.record,
            prepared.recipe,
            uploads,
            hashes_ahead,
        )
        for note in written_shards.notes:
            warnings.warn(note, LoraMergeWarning, stacklevel=2)
        written = [t.spec for _, tensors in written_shards.shards for t in tensors]
        if prepared.settings.save_method == "lora":  # the adapter's tensors, not the model's
            adapter = prepared.adapter
            keys = list(adapter.keys())
            written = [TensorSpec(k, adapter.dtype(k), adapter.shape(k)) for k in keys]
    finished = time.perf_counter()
    part = prepared.settings.part
    return MergeSummary(
        out=str(prepared.out),
        tensors=len(written),
        lora_modules=plan.lora_modules,
        replaced=plan.replaced,
        copied=plan.copied,
        shards=len(written_shards.shards),
        resumed_shards=written_shards.kept,
        bytes_written=sum(spec.nbytes for spec in written),
        seconds=round(finished - started, 3),
        base=str(prepared.base.folder),
        adapter=str(prepared.adapter_folder.location),
        files=sorted(f for f, _ in written_shards.shards)
        if part
        else sorted(p.name for p in prepared.out.iterdir()),
        lora_modules_by_layer=plan.lora_modules_by_layer,
        plan_seconds=round(planned - started, 3),
        write_seconds=round(finished - planned, 3),
        warnings=prepared.warnings + written_shards.notes,
        adapters=[str(folder.folder) for folder in prepared.adapter_folders],
        combine=prepared.recipe.method_name if prepared.recipe else None,
        part=str(part) if part else None,
        computed_shards=written_shards.computed,
        threads=prepared.settings.threads,
        gb_per_second=round(
            sum(spec.nbytes for spec in written) / 1e9 / max(finished - started, 1e-9), 6
        ),
    )


def _write_output(
    plan: MergePlan,
    base: BaseCheckpoint,
    adapter: TensorSource,
    adapter_folders: Sequence[AdapterFolder],
    out: Path,
    settings: RunSettings,
    record: MergeRecord,
    recipe: CombineRecipe | None = None,
    uploads: KeepShards | ShardUploads | None = None,
    hashes_ahead: FileHashes | None = None,
) -> _Written:
    """Stream the planned tensors into shards and finish OUT.

    With several adapters, the first one's tokenizer files win and ``recipe``
    says how they were combined. A part (``settings.part``) writes only its own
    shards into the parts' shared area and leaves OUT to the final step. Each
    finished shard is handed to ``uploads`` (``--low-disk`` uploads and deletes it).

    Returns:
        The shards written or kept, how many were kept, and notes for the user.
    """
    adapter_folder = adapter_folders[0]
    part = settings.part
    uploads = uploads or KeepShards()
    shards = shard_layout(plan.tensors, settings.max_shard_size)
    to_write = shards if part is None else part.select(shards)
    check_free_space(out, uploads.disk_needed([_shard_bytes(t) for _, t in to_write]))
    fingerprint = None
    if settings.resume or part is not None:
        by_content = not isinstance(uploads, KeepShards)  # --low-disk: parts on any machine
        fingerprint = _resume_fingerprint(shards, base, adapter_folders, recipe, by_content)
    uploads.start(out, fingerprint)
    metadata = shard_metadata(record)
    # --save-method lora writes no model card, nor does a part: it needs no input hashes.
    hashes = start_hashing(
        files_read_by_merge(base, adapter_folders),
        settings.hash_inputs and settings.save_method != "lora" and part is None,
        # Shards read from the Hub (--low-disk): the Hub gave their size and sha256.
        {path: (remote.size, remote.sha256) for path, remote in base.remote.items()},
        hashes_ahead,
    )
    progress, on_bytes = _progress_bar(
        sum(_shard_bytes(t) for _, t in to_write), settings.show_progress
    )
    with (
        StagingFolder(out, fingerprint, part, keep_verified=settings.resume) as staging,
        _open_base(base, settings.device) as base_reader,
        progress,
    ):
        if settings.save_method == "lora":
            write_normalized_adapter(staging.path, adapter_folder, adapter)
            on_bytes(plan.total_bytes)
            staging.commit()
            return _Written([("adapter", [])], 0, None, [])  # one file, the adapter's
        stream = _ShardStream(base_reader, adapter, settings, on_bytes, metadata)
        kept = _write_shards(staging, to_write, stream, uploads)
        if settings.verify:
            verify_output(staging.path, to_write, base.entries, adapter, base_reader)
        if part is not None:
            uploads.commit(staging.path, f"lora-merge part {part}")  # --low-disk: its journal
            if not isinstance(uploads, KeepShards):  # its shards are on the Hub, not here
                staging.leave_parts_area()
            return _Written(to_write, kept, len(to_write) - kept, staging.notes)
        _finish_folder(staging.path, shards, plan, base, adapter_folder, settings)
        write_model_card(staging.path, record, hashes.result())
        uploads.commit(staging.path, f"Upload model merged by lora-merge {__version__}")
        staging.commit()
    computed = len(shards) - kept if staging.from_parts or uploads.from_parts else None
    notes = staging.notes + uploads.notes + unproduced_note(computed, len(shards))
    return _Written(shards, kept, computed, notes)


class _ShardStream(NamedTuple):
    """What :func:`write_shard` needs besides the shard: the sources and how to stream."""

    base_reader: StoredTensorSource
    adapter: TensorSource
    settings: RunSettings
    on_bytes: Callable[[int], None]
    metadata: dict[str, str]


def _write_shards(
    staging: StagingFolder, shards: Shards, stream: _ShardStream, uploads: KeepShards | ShardUploads
) -> int:
    """Write each shard into ``staging``, journal it and hand it to ``uploads``.

    Shards already uploaded (``--low-disk --resume``), or verified in the staging
    folder (``--resume``, or the parts' shards in the final step), are kept.

    Returns:
        How many shards were kept from an earlier run (or from the parts).
    """
    kept = 0
    settings = stream.settings
    for file_name, tensors in shards:
        if uploads.has_shard(file_name) or staging.has_verified_shard(file_name):
            kept += 1
            stream.on_bytes(_shard_bytes(tensors))
            continue
        write_shard(
            staging.shard_path(file_name),
            tensors,
            stream.base_reader,
            stream.adapter,
            settings.device,
            settings.tile_budget,
            stream.on_bytes,
            settings.allow_nonfinite,
            stream.metadata,
            settings.threads,
        )
        staging.record_shard(file_name)
        uploads.shard_written(staging.path / file_name)
    uploads.wait()
    return kept


def _resume_fingerprint(
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


def _shard_bytes(tensors: list[PlannedTensor]) -> int:
    return sum(t.spec.nbytes for t in tensors)


def _finish_folder(
    folder: Path,
    shards: Shards,
    plan: MergePlan,
    base: BaseCheckpoint,
    adapter_folder: AdapterFolder,
    settings: RunSettings,
) -> None:
    """Write what surrounds the shards: the index, config.json and the side files."""
    if len(shards) > 1:
        write_index(folder, [(f, [t.spec for t in tensors]) for f, tensors in shards])
    requantized = None
    if settings.save_method == "merged_4bit":
        requantized = requantized_config(
            base, settings.quant_type, settings.double_quant, settings.output_dtype
        )
    write_config(
        folder,
        merged_model_config(base.config, base.quantization is not None, requantized),
        settings.output_dtype,
        plan.vocab_size,
        plan.config_updates,
    )
    # A loralib file's folder is no model folder: its side files all come from BASE.
    side_files = adapter_folder.folder if adapter_folder.config_path else base.folder
    copy_side_files(folder, base.folder, side_files)


@contextmanager
def _open_base(base: BaseCheckpoint, device: torch.device) -> Iterator[StoredTensorSource]:
    """The base's reader: quantized weights come out dequantized (on ``device``).

    Shards on the Hub (``--low-disk``) are read by range requests.
    """
    opened = RangedTensorReader(base.entries, base.remote) if base.remote else None
    with opened or SafetensorsReader(base.entries) as stored:
        if base.quantization is None:
            yield stored
        else:
            yield DequantizingReader(stored, base.tensors, device)
