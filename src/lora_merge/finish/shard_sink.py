"""Where a finished output shard goes, and the checks of ``--low-disk``, without huggingface_hub.

Without ``--low-disk`` a shard stays in OUT (:class:`KeepShards`); with it,
:class:`lora_merge.finish.hub_upload.ShardUploads` uploads and deletes it. Both
have the same methods, which ``api._write_output`` calls after each shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_merge.errors import UsageError

UPLOAD_JOURNAL_SUFFIX = ".lora-merge-uploads.json"


def check_hub_options(
    push_to_hub: str | None,
    *,
    private: bool,
    revision: str | None,
    low_disk: bool,
    verify: bool,
    adapter_output: bool,
) -> None:
    """Refuse Hub options that cannot work together, before anything is read.

    Args:
        push_to_hub: the ``--push-to-hub`` repo id, or None.
        private / revision: ``--private`` and ``--revision``, which need a repo.
        low_disk: ``--low-disk``, which needs a repo and deletes each shard once uploaded.
        verify / adapter_output: ``--verify`` and ``--save-method lora``, which need
            the shards kept.

    Raises:
        UsageError: the first conflict found, or a repo id the Hub would refuse.
    """
    if push_to_hub is None:
        if low_disk:
            raise UsageError(
                "--low-disk uploads each shard as it is written and deletes it: it needs "
                "--push-to-hub REPO (without it, OUT must hold the whole model)"
            )
        if private or revision is not None:
            raise UsageError("--private and --revision only apply with --push-to-hub")
        return
    from lora_merge.finish.publish import check_push_target  # imports huggingface_hub

    check_push_target(push_to_hub)
    for flag, given in (("--verify", verify), ("--save-method lora", adapter_output)):
        if low_disk and given:
            raise UsageError(
                f"{flag} cannot be used with --low-disk, which uploads and deletes "
                "each model shard as soon as it is written; drop one of them"
            )


def disk_needed(shard_sizes: Sequence[int], low_disk: bool) -> int:
    """The tensor bytes OUT's disk must have free for shards of these sizes.

    Every shard; with ``--low-disk``, two: the one uploading and the one being written.
    """
    return sum(sorted(shard_sizes, reverse=True)[:2]) if low_disk else sum(shard_sizes)


def upload_journal_path(out: Path) -> Path:
    """Where a resumable ``--low-disk`` run journals its uploaded shards: beside OUT."""
    return out.parent / f".{out.name}{UPLOAD_JOURNAL_SUFFIX}"


class KeepShards:
    """Without ``--low-disk``: every shard stays in OUT, the disk must hold them all."""

    commit_url: str | None = None  # nothing is committed here
    from_parts = False  # no staging branch of --part runs on the Hub

    @property
    def notes(self) -> list[str]:
        """Nothing to tell."""
        return []

    def __enter__(self) -> KeepShards:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Nothing to release."""

    def disk_needed(self, shard_sizes: Sequence[int]) -> int:
        """The tensor bytes OUT's disk must have free: every shard."""
        return disk_needed(shard_sizes, low_disk=False)

    def start(self, out: Path, fingerprint: str | None) -> None:
        """Nothing to prepare."""

    def has_shard(self, file_name: str) -> bool:
        """Never: shards kept by a resumed run are the staging folder's business."""
        return False

    def shard_written(self, path: Path) -> None:
        """The shard stays where it is."""

    def wait(self) -> None:
        """Nothing runs in the background."""

    def commit(self, folder: Path, message: str) -> None:
        """Nothing to commit: ``--push-to-hub`` uploads OUT once it is in place."""
