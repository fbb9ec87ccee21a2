"""The run, last step: prepare, write OUT, push it, and say what was done.

:func:`run_merge` takes checked settings (:func:`lora_merge.options.checked_options`),
prepares the merge (:mod:`lora_merge.run.prepare`), writes OUT
(:mod:`lora_merge.run.folder`), pushes it to the Hub when asked and returns a
:class:`MergeSummary`. :func:`lora_merge.api.merge` is its public face.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_merge._version import __version__
from lora_merge.errors import InvalidInputError, LoraMergeWarning, OutputError
from lora_merge.finish.publish import push_folder
from lora_merge.finish.shard_sink import KeepShards
from lora_merge.io.hashing import FileHashes
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.options import MergeSettings, SaveMethod
from lora_merge.run.copy_ahead import CopiesAhead
from lora_merge.run.folder import write_output
from lora_merge.run.prepare import prepare

if TYPE_CHECKING:  # imported for a --low-disk run only
    from lora_merge.finish.hub_upload import ShardUploads


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
        threads: CPU threads that merged at once.
        gb_per_second: tensor data written per second of the whole run, in GB (10^9 bytes).
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
    threads: int = 1
    gb_per_second: float = 0.0

    def to_dict(self) -> dict[str, object]:
        summary = asdict(self)
        if self.combine is None:  # a single-adapter merge keeps its documented fields
            del summary["adapters"], summary["combine"]
        for name in ("part", "computed_shards"):  # only runs of a split merge have them
            if summary[name] is None:
                del summary[name]
        return summary


def run_merge(
    settings: MergeSettings,
    hashes_ahead: FileHashes | None = None,
    copies_ahead: CopiesAhead | None = None,
) -> MergeSummary:
    """Merge a LoRA adapter into its base model and write a standalone model folder.

    Args:
        settings: what to merge, where to, and how, checked.
        hashes_ahead: input files' sha256 started before the run, or None.
        copies_ahead: BASE's untouched tensors, being copied since before the run, or None.

    Returns:
        A summary of the work done.

    Raises:
        LoraMergeError: for every problem with the inputs or OUT; nothing is
            written to OUT in that case and the inputs are never modified.
    """
    with _shard_uploads(settings) as uploads:
        summary = _merge_reporting_permissions(settings, uploads, hashes_ahead, copies_ahead)
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
    settings: MergeSettings,
    uploads: KeepShards | ShardUploads,
    hashes_ahead: FileHashes | None,
    copies_ahead: CopiesAhead | None,
) -> MergeSummary:
    """:func:`_merge`, with a permission problem turned into an error that names the path."""
    try:
        return _merge(settings, uploads, hashes_ahead, copies_ahead)
    except PermissionError as err:
        # Whatever step met it, a permission problem is the user's to fix: name the path.
        path = Path(err.filename or "?")
        out_parent = Path(settings.out).expanduser().absolute().parent
        error = OutputError if path.is_relative_to(out_parent) else InvalidInputError
        raise error(
            f"cannot access {path}: permission denied; check the file's permissions"
        ) from err


def _merge(
    options: MergeSettings,
    uploads: KeepShards | ShardUploads,
    hashes_ahead: FileHashes | None,
    copies_ahead: CopiesAhead | None,
) -> MergeSummary:
    started = time.perf_counter()
    with prepare(options) as prepared:  # resolve inputs -> read adapter -> plan
        plan = prepared.plan
        planned = time.perf_counter()
        written_shards = write_output(
            plan,
            prepared.base,
            prepared.adapter,
            prepared.adapter_folders,
            prepared.out,
            prepared.settings,
            prepared.record,
            prepared.tile_budget,
            prepared.recipe,
            uploads,
            hashes_ahead,
            copies_ahead,
        )
        for note in written_shards.notes:
            warnings.warn(note, LoraMergeWarning, stacklevel=2)
        written = [t.spec for _, tensors in written_shards.shards for t in tensors]
        if (
            prepared.settings.save_method is SaveMethod.LORA
        ):  # the adapter's tensors, not the model's
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
