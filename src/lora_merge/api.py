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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

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
from lora_merge.finish.staging import StagingFolder
from lora_merge.finish.verify import verify_output
from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.dequantizing_reader import DequantizingReader
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

__all__ = ["MergePreview", "MergeSummary", "merge", "preview_merge"]

Shards = list[tuple[str, list[PlannedTensor]]]


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did.

    Attributes:
        out: the folder written.
        tensors: output tensors written.
        lora_modules: LoRA modules merged.
        replaced: base tensors replaced by adapter tensors.
        copied: tensors copied byte for byte.
        shards: safetensors files in OUT.
        resumed_shards: shards kept from an interrupted run (``--resume``).
        bytes_written: tensor data bytes written.
        seconds: wall time of the merge.
        base / adapter: the resolved input folders.
        files: the files written to OUT.
        lora_modules_by_layer: LoRA modules merged, by layer kind.
        plan_seconds / write_seconds: time spent planning, and streaming and finishing OUT.
        warnings: what the run warned about (also issued as ``LoraMergeWarning``).
        pushed_to / commit_url: the Hub repo OUT was uploaded to and the commit, if pushed.
        adapters: every adapter combined (``adapter`` is the first), and
            ``combine`` the method, when several adapters (or combination options) were given.
    """

    out: str
    tensors: int
    lora_modules: int
    replaced: int
    copied: int
    shards: int
    resumed_shards: int
    bytes_written: int
    seconds: float
    base: str = ""
    adapter: str = ""
    files: list[str] = field(default_factory=list)
    lora_modules_by_layer: dict[str, int] = field(default_factory=dict)
    plan_seconds: float = 0.0
    write_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    pushed_to: str | None = None
    commit_url: str | None = None
    adapters: list[str] = field(default_factory=list)
    combine: str | None = None
    part: str | None = None
    computed_shards: int | None = None

    def to_dict(self) -> dict[str, object]:
        summary = asdict(self)
        if self.combine is None:  # a single-adapter merge keeps its documented fields
            del summary["adapters"], summary["combine"]
        for name in ("part", "computed_shards"):  # only runs of a split merge have them
            if summary[name] is None:
                del summary[name]
        return summary


class _Written(NamedTuple):
    """What :func:`_write_output` did: shards written or kept, and what to tell the user."""

    shards: Shards
    kept: int
    computed: int | None
    notes: list[str]


def merge(options: MergeOptions) -> MergeSummary:
    """Merge a LoRA adapter into its base model and write a standalone model folder.

    Args:
        options: what to merge, where to, and how.

    Returns:
        A summary of the work done.

    Raises:
        UsageError: options that are invalid or contradict each other, raised
            before anything is read or written.
        LoraMergeError: for every problem with the inputs or OUT; nothing is
            written to OUT in that case and the inputs are never modified.
    """
    settings = checked_options(options)
    try:
        summary = _merge(settings)
    except PermissionError as err:
        # Whatever step met it, a permission problem is the user's to fix: name the path.
        path = Path(err.filename or "?")
        out_parent = Path(settings.out).expanduser().absolute().parent
        error = OutputError if path.is_relative_to(out_parent) else InvalidInputError
        raise error(
            f"cannot access {path}: permission denied; check the file's permissions"
        ) from err
    if settings.push_to_hub is None:
        return summary
    commit_url = push_folder(
        Path(summary.out),
        settings.push_to_hub,
        private=settings.private,
        revision=settings.hub_revision,
        message=f"Upload model merged by lora-merge {__version__}",
        quiet=settings.quiet,
    )
    return replace(summary, pushed_to=settings.push_to_hub, commit_url=commit_url)


def _merge(options: MergeSettings) -> MergeSummary:
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
) -> _Written:
    """Stream the planned tensors into shards and finish OUT.

    With several adapters, the first one's tokenizer files win and ``recipe``
    says how they were combined. A part (``settings.part``) writes only its own
    shards into the parts' shared area and leaves OUT to the final step.

    Returns:
        The shards written or kept, how many were kept, and notes for the user.
    """
    adapter_folder = adapter_folders[0]
    part = settings.part
    shards = shard_layout(plan.tensors, settings.max_shard_size)
    to_write = shards if part is None else part.select(shards)
    to_write_bytes = sum(t.spec.nbytes for _, tensors in to_write for t in tensors)
    check_free_space(out, to_write_bytes)
    fingerprint = None
    if settings.resume or part is not None:
        fingerprint = _resume_fingerprint(shards, base, adapter_folders, recipe)
    metadata = shard_metadata(record)
    # --save-method lora writes no model card, nor does a part: it needs no input hashes.
    hashes = start_hashing(
        files_read_by_merge(base, adapter_folders),
        settings.hash_inputs and settings.save_method != "lora" and part is None,
    )
    progress, on_bytes = _progress_bar(to_write_bytes, settings.show_progress)
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
        kept = _write_shards(staging, to_write, base_reader, adapter, settings, on_bytes, metadata)
        if settings.verify:
            verify_output(staging.path, to_write, base.entries, adapter, base_reader)
        if part is not None:
            return _Written(to_write, kept, len(to_write) - kept, staging.notes)
        _finish_folder(staging.path, shards, plan, base, adapter_folder, settings)
        write_model_card(staging.path, record, hashes.result())
        staging.commit()
    computed = len(shards) - kept if staging.from_parts else None
    return _Written(shards, kept, computed, staging.notes + unproduced_note(computed, len(shards)))


def _write_shards(
    staging: StagingFolder,
    shards: Shards,
    base_reader: StoredTensorSource,
    adapter: TensorSource,
    settings: RunSettings,
    on_bytes: Callable[[int], None],
    metadata: dict[str, str],
) -> int:
    """Write each shard into ``staging`` and journal it, keeping the verified ones.

    Returns:
        How many shards were kept from an earlier run (or from the parts).
    """
    kept = 0
    for file_name, tensors in shards:
        if staging.has_verified_shard(file_name):
            kept += 1
            on_bytes(sum(t.spec.nbytes for t in tensors))
            continue
        write_shard(
            staging.shard_path(file_name),
            tensors,
            base_reader,
            adapter,
            settings.device,
            settings.tile_budget,
            on_bytes,
            settings.allow_nonfinite,
            metadata,
        )
        staging.record_shard(file_name)
    return kept


def _resume_fingerprint(
    shards: Shards,
    base: BaseCheckpoint,
    adapter_folders: Sequence[AdapterFolder],
    recipe: CombineRecipe | None,
) -> str:
    """The digest a ``--resume`` run's journal must carry for its shards to be kept."""
    inputs = [entry.path for entry in base.entries.values()]
    for folder in adapter_folders:
        inputs += [path for path in (folder.config_path, folder.weights_path) if path]
    return merge_fingerprint(shards, inputs, __version__, recipe.describe() if recipe else "")


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
    """The base's reader: quantized weights come out dequantized (on ``device``)."""
    with SafetensorsReader(base.entries) as stored:
        if base.quantization is None:
            yield stored
        else:
            yield DequantizingReader(stored, base.tensors, device)
