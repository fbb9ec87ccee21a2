"""The run, fourth step: write OUT, the shards and what surrounds them, in its staging folder.

:func:`write_output` opens the staging folder, streams the shards into it
(:mod:`lora_merge.run.shards`), verifies them when asked, writes the index,
config.json, the side files and the model card (``finish/``) and renames the
folder into place.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import closing, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from lora_merge._version import __version__
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.finish.adapter_output import write_normalized_adapter
from lora_merge.finish.disk import check_free_space
from lora_merge.finish.folder import (
    copy_side_files,
    merged_model_config,
    write_config,
    write_index,
)
from lora_merge.finish.input_hashes import files_read_by_merge, start_hashing
from lora_merge.finish.parts import unproduced_note
from lora_merge.finish.provenance import MergeRecord, shard_metadata, write_model_card
from lora_merge.finish.shard_sink import KeepShards
from lora_merge.finish.staging import StagingFolder
from lora_merge.finish.verify import verify_output
from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.hashing import FileHashes
from lora_merge.io.reader import TensorSource
from lora_merge.options import MergeSettings, SaveMethod
from lora_merge.plan.model import MergePlan
from lora_merge.plan.requantize import requantized_config
from lora_merge.plan.shards import shard_layout, shards_of_part
from lora_merge.run.copy_ahead import CopiesAhead
from lora_merge.run.shards import (
    Shards,
    ShardStream,
    open_base,
    resume_fingerprint,
    shard_bytes,
    write_shards,
)
from lora_merge.stream.progress import progress_bar

if TYPE_CHECKING:  # imported for a --low-disk run only
    from lora_merge.finish.hub_upload import ShardUploads


class Written(NamedTuple):
    """What :func:`write_output` did: shards written or kept, and what to tell the user."""

    shards: Shards
    kept: int
    computed: int | None
    notes: list[str]


def write_output(
    plan: MergePlan,
    base: BaseCheckpoint,
    adapter: TensorSource,
    adapter_folders: Sequence[AdapterFolder],
    out: Path,
    settings: MergeSettings,
    record: MergeRecord,
    tile_budget: int,
    recipe: CombineRecipe | None = None,
    uploads: KeepShards | ShardUploads | None = None,
    hashes_ahead: FileHashes | None = None,
    copies_ahead: CopiesAhead | None = None,
) -> Written:
    """Stream the planned tensors into shards and finish OUT.

    With several adapters, the first one's tokenizer files win and ``recipe``
    says how they were combined. A part (``settings.part``) writes only its own
    shards into the parts' shared area and leaves OUT to the final step. Each
    finished shard is handed to ``uploads`` (``--low-disk`` uploads and deletes it).
    ``copies_ahead`` (a plain run's untouched tensors, being copied since before torch
    was imported) gives its folder to OUT's staging folder, and its copies to the stream.

    Returns:
        The shards written or kept, how many were kept, and notes for the user.
    """
    adapter_folder = adapter_folders[0]
    part = settings.part
    uploads = uploads or KeepShards()
    shards = shard_layout(plan.tensors, settings.max_shard_size)
    to_write = shards if part is None else shards_of_part(part, shards)
    check_free_space(out, uploads.disk_needed([shard_bytes(t) for _, t in to_write]))
    fingerprint = None
    if settings.resume or part is not None:
        by_content = uploads.remote  # --low-disk: parts on any machine
        fingerprint = resume_fingerprint(shards, base, adapter_folders, recipe, by_content)
    uploads.start(out, fingerprint)
    metadata = shard_metadata(record)
    # --save-method lora writes no model card, nor does a part: it needs no input hashes.
    hashes = start_hashing(
        files_read_by_merge(base, adapter_folders),
        settings.hash_inputs and settings.save_method is not SaveMethod.LORA and part is None,
        # Shards read from the Hub (--low-disk): the Hub gave their size and sha256.
        {path: (remote.size, remote.sha256) for path, remote in base.remote.items()},
        hashes_ahead,
    )
    # A resumable run or a part stages elsewhere, and an adapter written as it is has no
    # shards: the copies are not taken (and deleted).
    staged_ahead = None
    if (
        copies_ahead is not None
        and fingerprint is None
        and part is None
        and settings.save_method is not SaveMethod.LORA
    ):
        staged_ahead = copies_ahead.hand_over(out)
    progress, on_bytes = progress_bar(
        sum(shard_bytes(t) for _, t in to_write), not settings.quiet and sys.stderr.isatty()
    )
    with (
        StagingFolder(
            out, fingerprint, part, keep_verified=settings.resume, path=staged_ahead
        ) as staging,
        # Stopped before the staging folder is committed or deleted.
        closing(copies_ahead) if copies_ahead is not None else nullcontext(),
        open_base(
            base, settings.device, plan, hashes_ahead.pacing if hashes_ahead else None
        ) as base_reader,
        progress,
    ):
        if settings.save_method is SaveMethod.LORA:
            write_normalized_adapter(staging.path, adapter_folder, adapter)
            on_bytes(plan.total_bytes)
            staging.commit()
            return Written([("adapter", [])], 0, None, [])  # one file, the adapter's
        stream = ShardStream(
            base_reader, adapter, settings, tile_budget, on_bytes, metadata, copies_ahead
        )
        kept = write_shards(staging, to_write, stream, uploads)
        if hashes_ahead is not None:
            # Every byte the stream reads is read: the rest (a tensor no output needs) is
            # hashed without waiting for reads that will not come.
            hashes_ahead.release_pacing()
        if settings.verify:
            verify_output(staging.path, to_write, base.entries, adapter, base_reader)
        if part is not None:
            uploads.commit(staging.path, f"lora-merge part {part}")  # --low-disk: its journal
            if uploads.remote:  # its shards are on the Hub, not here
                staging.leave_parts_area()
            return Written(to_write, kept, len(to_write) - kept, staging.notes)
        finish_folder(staging.path, shards, plan, base, adapter_folder, settings)
        write_model_card(staging.path, record, hashes.result())
        uploads.commit(staging.path, f"Upload model merged by lora-merge {__version__}")
        staging.commit()
    computed = len(shards) - kept if staging.from_parts or uploads.from_parts else None
    notes = staging.notes + uploads.notes + unproduced_note(computed, len(shards))
    return Written(shards, kept, computed, notes)


def finish_folder(
    folder: Path,
    shards: Shards,
    plan: MergePlan,
    base: BaseCheckpoint,
    adapter_folder: AdapterFolder,
    settings: MergeSettings,
) -> None:
    """Write what surrounds the shards: the index, config.json and the side files."""
    if len(shards) > 1:
        write_index(folder, [(f, [t.spec for t in tensors]) for f, tensors in shards])
    requantized = None
    if settings.save_method is SaveMethod.MERGED_4BIT:
        requantized = requantized_config(
            base, settings.quant_type, settings.double_quant, settings.output_dtype
        )
    elif settings.save_method is SaveMethod.MERGED_NATIVE and base.quantization is not None:
        requantized = dict(base.quantization.config)  # BASE's own format, kept
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
