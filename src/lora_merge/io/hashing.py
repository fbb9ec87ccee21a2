"""sha256 of files and byte ranges: read in bounded chunks, or fed by the threads that read them.

Provenance needs the sha256 of every input file, and the merge reads most of
those bytes anyway. :class:`InOrderHasher` hashes them as the stream holds them
in memory, so they are not read a second time (measured, 2 cores: reading a
cached file again costs ~0.3 CPU-s per GB, sha256 itself ~0.6).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from lora_merge.errors import InvalidInputError
from lora_merge.io.positional import PositionalFile

HASH_CHUNK_BYTES = 8 * 2**20
# Bytes an InOrderHasher keeps copies of while they wait for the ones before them:
# a few tiles or copy pieces per thread (see stream/executor.py), not a tensor.
REORDER_WINDOW_BYTES = 4 * 2**20
# Gaps are read from the file in pieces of this size (cache-sized, as the stream's).
GAP_READ_BYTES = 256 * 2**10


def sha256_of(path: Path, start: int = 0, nbytes: int | None = None) -> str:
    """Hex sha256 of ``nbytes`` bytes of ``path`` from ``start`` (to the end by default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = nbytes
        while remaining is None or remaining > 0:
            chunk = handle.read(
                HASH_CHUNK_BYTES if remaining is None else min(HASH_CHUNK_BYTES, remaining)
            )
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


class InOrderHasher:
    """The sha256 of one file, fed with byte ranges by whichever threads hold them.

    sha256 is sequential, so bytes must reach it in file order while the stream's
    threads read a file's tiles a few at a time, each at its own pace. A range
    that starts at or before the end of the hashed prefix is hashed at once,
    from the caller's memory (hashlib releases the GIL); one that arrives early
    is copied into a bounded reorder window and hashed when the prefix reaches
    it. One that finds the window full waits while another thread drains it
    (sha256 is the slower side, so the readers must not run ahead of it), and is
    dropped when no thread is hashing. Whatever never arrived (the header,
    dropped ranges, tensors the stream does not read) is read from the file when
    the prefix must pass it (:meth:`fill_to`, :meth:`hexdigest`), so the digest is
    always that of the file's bytes, however the stream went.

    Args:
        path: the file.
        window_bytes: the most bytes kept in copies at once.

    Attributes:
        bytes_from_memory: bytes hashed from what the stream handed over.
        bytes_from_file: bytes the hasher read from the file itself.
    """

    def __init__(self, path: Path, window_bytes: int = REORDER_WINDOW_BYTES) -> None:
        self.path = path
        self.size = os.stat(path).st_size
        self.bytes_from_memory = 0
        self.bytes_from_file = 0
        self._window_bytes = window_bytes
        self._digest = hashlib.sha256()
        self._cursor = 0  # the end of the hashed prefix
        self._hashing = False  # one thread at a time updates the digest
        self._waiting: dict[int, bytes] = {}  # offset -> an early range's copy
        self._waiting_bytes = 0
        self._condition = threading.Condition()

    def feed(self, offset: int, data: memoryview) -> None:
        """Hand over the file's bytes at ``offset`` (never blocks on another thread).

        ``data`` is only read during the call: the caller may reuse its buffer after.
        """
        with self._condition:
            while True:
                if offset + len(data) <= self._cursor:
                    return
                if offset <= self._cursor and not self._hashing:
                    break
                if self._keep_for_later(offset, data) or not self._hashing:
                    return  # kept, or dropped: nobody is hashing, so waiting could be forever
                # The window is full and another thread is draining it: wait for room
                # (backpressure) rather than drop bytes that would be read again.
                self._condition.wait()
            self._hashing = True
            data = data[self._cursor - offset :]
        self._hash_from(data, from_memory=True)

    def fill_to(self, offset: int, wait: bool = True) -> None:
        """Hash everything before ``offset`` now, reading from the file what never arrived.

        Raises:
            InvalidInputError: the file ends before ``offset`` (it changed under us).

        Args:
            offset: where the hashed prefix must reach.
            wait: wait while another thread is hashing; if False, leave the work to it
                (or to a later call) and return at once.
        """
        with self._condition:
            while self._hashing and wait and self._cursor < offset:
                self._condition.wait()
            if self._cursor >= offset or self._hashing:
                return
            self._hashing = True
        try:
            with PositionalFile(self.path) as file:
                buffer = memoryview(bytearray(GAP_READ_BYTES))
                while True:
                    with self._condition:
                        waiting = self._take_waiting_at_cursor()
                        cursor = self._cursor
                    if waiting is not None:
                        self._update(waiting, from_memory=True)
                        continue
                    if cursor >= offset:
                        break
                    piece = buffer[
                        : min(GAP_READ_BYTES, offset - cursor, self._next_waiting(cursor))
                    ]
                    count = file.read_into(piece, cursor)
                    if not count:
                        raise InvalidInputError(
                            f"{self.path} ended at byte {cursor} while lora-merge was hashing "
                            "it: the file was truncated or changed while lora-merge was reading it"
                        )
                    self._update(piece[:count], from_memory=False)
        finally:
            with self._condition:
                self._hashing = False
                self._condition.notify_all()

    def hexdigest(self) -> str:
        """The file's sha256, after hashing whatever the stream did not hand over."""
        self.fill_to(self.size)
        return self._digest.hexdigest()

    def _keep_for_later(self, offset: int, data: memoryview) -> bool:
        """Copy an early range into the window if there is room; say whether it was kept."""
        if offset in self._waiting:
            return True
        if self._waiting_bytes + len(data) > self._window_bytes:
            return False
        self._waiting[offset] = bytes(data)
        self._waiting_bytes += len(data)
        return True

    def _hash_from(self, data: memoryview | None, from_memory: bool) -> None:
        """Hash ``data`` (which starts at the cursor), then the waiting ranges it reaches."""
        try:
            while data is not None:
                self._update(data, from_memory)
                with self._condition:
                    data = self._take_waiting_at_cursor()
                from_memory = True
        finally:
            with self._condition:
                self._hashing = False
                self._condition.notify_all()

    def _update(self, data: memoryview | bytes, from_memory: bool) -> None:
        """Add ``data`` (at the cursor) to the digest; only the hashing thread calls this."""
        self._digest.update(data)
        with self._condition:
            self._cursor += len(data)
            if from_memory:
                self.bytes_from_memory += len(data)
            else:
                self.bytes_from_file += len(data)

    def _take_waiting_at_cursor(self) -> memoryview | None:
        """The unhashed part of a waiting range that covers the cursor (lock held)."""
        for offset in sorted(self._waiting):
            if offset > self._cursor:
                break
            data = self._waiting.pop(offset)
            self._waiting_bytes -= len(data)
            self._condition.notify_all()  # room in the window
            if offset + len(data) > self._cursor:
                return memoryview(data)[self._cursor - offset :]
        return None

    def _next_waiting(self, cursor: int) -> int:
        """Bytes from ``cursor`` to the next waiting range (a large number if none)."""
        with self._condition:
            starts = [offset - cursor for offset in self._waiting if offset > cursor]
        return min(starts, default=GAP_READ_BYTES)
