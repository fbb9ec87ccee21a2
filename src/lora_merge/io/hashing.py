"""sha256 of files and byte ranges, read through bounded memory maps.

A file's pages are hashed where they lie in the page cache, through a mapping of
one window at a time, instead of being copied into a buffer by ``read``: the copy
is kernel time spent on every byte (measured on a 725 MB shard in the page cache:
0.08-0.11 system CPU-s with 1-8 MiB reads, none through the map, the same 0.49
user CPU-s of sha256 either way). Each window is unmapped before the next, so
at most one window of the file counts in the process's resident memory.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

HASH_CHUNK_BYTES = 8 * 2**20
# Bytes mapped at once: what hashing adds to resident memory at most. A multiple of every
# platform's mapping granularity (64 KiB on Windows).
HASH_WINDOW_BYTES = 8 * 2**20


def sha256_of(path: Path, start: int = 0, nbytes: int | None = None) -> str:
    """Hex sha256 of ``nbytes`` bytes of ``path`` from ``start`` (to the end by default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        end = handle.seek(0, 2)
        stop = end if nbytes is None else min(end, start + nbytes)
        try:
            _hash_mapped(digest.update, handle.fileno(), start, stop)
        except (OSError, ValueError):
            # Not mappable (a special or remote file system): read it instead.
            digest = hashlib.sha256()
            _hash_read(digest.update, handle, start, stop)
    return digest.hexdigest()


def _hash_mapped(
    update: Callable[[memoryview], None], descriptor: int, start: int, stop: int
) -> None:
    """Feed bytes ``start:stop`` of the file to ``update``, one mapped window at a time."""
    position = start
    while position < stop:
        # A mapping starts at a multiple of the granularity; hash from where the range does.
        window_start = position - position % mmap.ALLOCATIONGRANULARITY
        length = min(HASH_WINDOW_BYTES, stop - window_start)
        if os.fstat(descriptor).st_size < window_start + length:
            # Touching a mapped page past the end of a file truncated meanwhile would kill
            # the process (SIGBUS); reads instead see the end, and the merge's own reads
            # report the change.
            raise OSError(f"file shorter than {window_start + length} bytes")
        # Every view of the window is released (in reverse order) before it is unmapped.
        with (
            mmap.mmap(descriptor, length, offset=window_start, access=mmap.ACCESS_READ) as window,
            memoryview(window) as view,
            view[position - window_start :] as wanted,
        ):
            update(wanted)
        position = window_start + length


def _hash_read(
    update: Callable[[memoryview], None], handle: BinaryIO, start: int, stop: int
) -> None:
    """Feed bytes ``start:stop`` to ``update`` by reads into one reused buffer."""
    handle.seek(start)
    buffer = memoryview(bytearray(HASH_CHUNK_BYTES))
    remaining = stop - start
    while remaining > 0:
        count = handle.readinto(buffer[: min(HASH_CHUNK_BYTES, remaining)])  # type: ignore[attr-defined]
        if not count:
            break
        update(buffer[:count])
        remaining -= count
