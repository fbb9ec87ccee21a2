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


def check_low_disk(push_to_hub: str | None, verify: bool, save_method: str) -> None:
    """Refuse ``--low-disk`` where it cannot work.

    Raises:
        UsageError: no ``--push-to-hub`` (OUT would have to hold the model), or an
            option that needs the shards kept (``--verify``, ``--save-method lora``).
    """
    if push_to_hub is None:
        raise UsageError(
            "--low-disk uploads each shard as it is written and deletes it: it needs "
            "--push-to-hub REPO (without it, OUT must hold the whole model)"
        )
    for flag, given in (("--verify", verify), ("--save-method lora", save_method == "lora")):
        if given:
            raise UsageError(
                f"{flag} cannot be used with --low-disk, which uploads and deletes each "
                "model shard as soon as it is written; drop one of them"
            )


def upload_journal_path(out: Path) -> Path:
    """Where a resumable ``--low-disk`` run journals its uploaded shards: beside OUT."""
    return out.parent / f".{out.name}{UPLOAD_JOURNAL_SUFFIX}"


class KeepShards:
    """Without ``--low-disk``: every shard stays in OUT, the disk must hold them all."""

    commit_url: str | None = None  # nothing is committed here

    def __enter__(self) -> KeepShards:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Nothing to release."""

    def disk_needed(self, shard_sizes: Sequence[int]) -> int:
        """The tensor bytes OUT's disk must have free: every shard."""
        return sum(shard_sizes)

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
