"""Where a finished output shard goes, without huggingface_hub.

Without ``--low-disk`` a shard stays in OUT (:class:`KeepShards`); with it,
:class:`lora_merge.finish.hub_upload.ShardUploads` uploads and deletes it. Both
have the same methods, which :mod:`lora_merge.run.folder` calls after each shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

UPLOAD_JOURNAL_SUFFIX = ".lora-merge-uploads.json"


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

    remote = False  # shards stay on this machine, in OUT
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
