"""The library's public face: :func:`merge`, :func:`preview_merge` and what they return.

Both read a :class:`~lora_merge.options.MergeOptions`, check it once
(:func:`~lora_merge.options.checked_options`: a usage error costs nothing, and
the CLI and Python accept the same values), then hand the checked settings to
the run (:mod:`lora_merge.run`): prepare -> write the shards -> finish OUT ->
push, or prepare -> describe for :func:`preview_merge`.
"""

from __future__ import annotations

from lora_merge.io.hashing import FileHashes
from lora_merge.options.checks import checked_options
from lora_merge.options.settings import MergeOptions
from lora_merge.run.copy_ahead import CopiesAhead
from lora_merge.run.merge import MergeSummary, run_merge
from lora_merge.run.preview import MergePreview, preview_settings

__all__ = ["MergePreview", "MergeSummary", "merge", "preview_merge"]


def merge(
    options: MergeOptions,
    hashes_ahead: FileHashes | None = None,
    copies_ahead: CopiesAhead | None = None,
) -> MergeSummary:
    """Merge a LoRA adapter into its base model and write a standalone model folder.

    Args:
        options: what to merge, where to, and how.
        hashes_ahead: input files' sha256 started before this call (see
            :func:`lora_merge.run.hash_ahead.hash_inputs_ahead`); the model card takes
            them from there. None: the files are hashed during the run.
        copies_ahead: BASE's untouched tensors, being copied into OUT's staging folder
            since before this call (see :func:`lora_merge.run.copy_ahead.copy_untouched_ahead`);
            the run checks each copy against its own plan before it skips a tensor.
            None: every tensor is written by the run.

    Returns:
        A summary of the work done.

    Raises:
        UsageError: options that are invalid or contradict each other, raised
            before anything is read or written.
        LoraMergeError: for every problem with the inputs or OUT; nothing is
            written to OUT in that case and the inputs are never modified.
    """
    settings = checked_options(options)
    return run_merge(settings, hashes_ahead, copies_ahead)


def preview_merge(options: MergeOptions) -> MergePreview:
    """Decide everything :func:`merge` would, and describe it without writing anything.

    Args:
        options: what to merge, where to, and how.

    Returns:
        What the merge would read, compute and write (``--dry-run``).

    Raises:
        UsageError: as :func:`merge`.
        LoraMergeError: everything :func:`merge` would refuse before writing,
            including a disk too small for OUT.
    """
    settings = checked_options(options)
    return preview_settings(settings)
