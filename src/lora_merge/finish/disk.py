"""Room for OUT: the free space on its disk, checked before the first byte is written."""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_merge.errors import OutputError

# Room left on OUT's disk beyond the shards (config, tokenizer, filesystem slack).
DISK_SPACE_MARGIN_BYTES = 64 * 2**20


def free_space(out: Path) -> int:
    """Free bytes on the disk that will hold OUT (its nearest existing ancestor's disk)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def check_free_space(out: Path, needed: int) -> None:
    """Refuse a merge whose shards would not fit beside what else OUT holds.

    Args:
        out: the output folder (it may not exist yet).
        needed: the tensor bytes the shards hold.

    Raises:
        OutputError: the disk has less than ``needed`` plus a margin free.
    """
    free = free_space(out)
    parent = out.parent
    if free < needed + DISK_SPACE_MARGIN_BYTES:
        raise OutputError(
            f"OUT needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free on the disk "
            f"holding {parent}; free some space or choose another OUT"
        )
