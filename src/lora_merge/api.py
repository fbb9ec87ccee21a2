"""The library's public face: :func:`merge`, :func:`preview_merge` and what they return.

Both read a :class:`~lora_merge.options.MergeOptions`, check it once
(:func:`~lora_merge.options.checked_options`: a usage error costs nothing, and
the CLI and Python accept the same values), then hand the checked settings to
the run (:mod:`lora_merge.run`): prepare -> write the shards -> finish OUT ->
push, or prepare -> describe for :func:`preview_merge`.
"""

from __future__ import annotations

from lora_merge.options.checks import checked_options
from lora_merge.options.settings import MergeOptions
from lora_merge.run.merge import MergeSummary, run_merge
from lora_merge.run.preview import MergePreview, preview_settings

__all__ = ["MergePreview", "MergeSummary", "merge", "preview_merge"]


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
    return run_merge(settings)


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
