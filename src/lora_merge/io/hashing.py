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
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from lora_merge.io.read_pacing import ReadPacing, file_identity

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


class FileHashes:
    """sha256 of whole files, started ahead on a few threads and looked up when needed.

    A file is known by its device and inode, so any path that names it finds its
    digest. A digest is used only if the file's size, modification and change times
    are still those it had when it was hashed; otherwise it is hashed again (the
    change time catches a file rewritten with its modification time set back).
    :meth:`close` stops the threads at their next window, so a run that fails
    early does not wait for gigabytes to be hashed before it exits.

    Attributes:
        pacing: how far the merge has read the paced files, which each window of
            theirs waits for (see :mod:`lora_merge.io.read_pacing`); None: no file waits.
    """

    def __init__(
        self, paths: Iterable[Path], workers: int, pacing: ReadPacing | None = None
    ) -> None:
        """Start hashing ``paths`` (in order, ``workers`` files at once), each window of a
        paced file once ``pacing`` allows it."""
        self.pacing = pacing
        # Before any of the hashing: the digest cache stores no digest of a file written
        # after this (see lora_merge.io.known_digests.DigestCache).
        self.started_ns = time.time_ns()
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lora-merge-hash")
        self._started: dict[tuple[int, int], Future[tuple[_Stamp, str]]] = {}
        for path in paths:
            try:
                identity = file_identity(os.stat(path))
            except OSError:
                continue  # the run itself will say what is wrong with it
            if identity not in self._started:
                self._started[identity] = pool.submit(self._stamped_sha256, path)
        pool.shutdown(wait=False)

    def __enter__(self) -> FileHashes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop hashing: files not started are skipped, the others stop at their next window."""
        self._stop.set()
        self.release_pacing()  # a thread waiting for the merge's reads wakes up and stops
        for future in self._started.values():
            future.cancel()

    def release_pacing(self) -> None:
        """Hash the rest without waiting: the merge has read all it reads (or stops)."""
        if self.pacing is not None:
            self.pacing.release()

    def sha256(self, path: Path) -> str:
        """The file's hex sha256: the one hashed ahead if the file is unchanged since, else now."""
        status = os.stat(path)
        future = self._started.get(file_identity(status))
        if future is not None and not future.cancelled():
            try:
                stamp, digest = future.result()
            except (OSError, _Stopped):
                pass
            else:
                if stamp == _stamp(status):
                    return digest
        return sha256_of(path)

    def _stamped_sha256(self, path: Path) -> tuple[_Stamp, str]:
        """The file's size, mtime and ctime, then its sha256 (a change during hashing shows in
        the stamp).

        One window at a time, each once the pacing allows it (before it is mapped: mapping
        it and hashing it is what reads it from the disk).
        """
        status = os.stat(path)
        stamp, identity = _stamp(status), file_identity(status)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            end = handle.seek(0, 2)
            mapped = True
            position = 0
            while position < end:
                stop = min(end, position + HASH_WINDOW_BYTES)
                if self.pacing is not None:
                    self.pacing.wait_to_hash(identity, stop, self._stop)
                if self._stop.is_set():
                    raise _Stopped
                if mapped:
                    try:
                        _hash_mapped(digest.update, handle.fileno(), position, stop)
                    except OSError:
                        # Not mappable: read it instead, from the start (the windows before
                        # this one were paced already).
                        mapped, digest = False, hashlib.sha256()
                        _hash_read(digest.update, handle, 0, stop)
                else:
                    _hash_read(digest.update, handle, position, stop)
                position = stop
        return stamp, digest.hexdigest()


class _Stopped(Exception):
    """Raised inside a hashing thread once :meth:`FileHashes.close` was called."""


_Stamp = tuple[int, int, int]


def _stamp(status: os.stat_result) -> _Stamp:
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns
