"""Tiles of an input file read in place, through a memory map, where the OS can populate one.

A positional read (:class:`~lora_merge.io.positional.PositionalFile`) copies a
tile from the page cache into our buffer in the kernel, and the merge then reads
the buffer: measured on Linux, about 0.08 system ns per byte for the copy alone,
1 CPU-s at 7B. A memory map lets the merge read the page cache's own pages, so
that copy is gone. What a map costs instead is mapping the pages, and Linux
(5.14 and later) does that for a whole tile in one call with
``MADV_POPULATE_READ``: about 0.006 system ns per byte, measured the same way.

Two things keep it honest:

* **Memory stays bounded.** Pages of a map that a process has touched count in
  its resident set, so a reader that mapped a whole shard and kept every page it
  read would grow to the shard's size. :class:`MappedFile` maps the whole file
  once but the reader releases each tile's pages (``MADV_DONTNEED``) when the
  same thread asks for its next tile (see
  :class:`~lora_merge.io.reader.SafetensorsReader`): one tile per thread stays
  mapped. Releasing pages of an unmodified file mapping never loses data: a page
  touched again is mapped again from the page cache, with the same bytes.
* **The input is never written.** The map is read-only (``PROT_READ``): a
  write to a tile would fault rather than reach the file. Nothing writes to a
  tile that was read; the tests' pinned outputs run every format through it.

Where the OS has no ``MADV_POPULATE_READ`` (macOS, Windows, Linux before 5.14,
or a Python without ``mmap.madvise``), or the file cannot be mapped (empty, a
filesystem without ``mmap``, a 32-bit address space), :func:`map_for_tiles`
returns None and the reader keeps its positional reads: the same bytes, one copy
more.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import sys
import threading
import warnings

import torch

# Python's mmap module names MADV_POPULATE_READ only from 3.14 on; Linux's value is
# 22 (include/uapi/asm-generic/mman-common.h). Other systems may use 22 for another
# advice, so it is taken only on Linux. A kernel before 5.14 refuses it (EINVAL):
# see map_for_tiles.
POPULATE_READ: int | None = getattr(
    mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None
)
_DONT_NEED: int | None = getattr(mmap, "MADV_DONTNEED", None)
# The largest page-cache folio Linux maps at once with 4 KiB pages (one page-table
# entry of the level above: 2 MiB on x86-64 and arm64); see MappedFile.release.
_RELEASE_ALIGNMENT = 2 * 2**20


def _accept_read_only_buffers() -> None:
    """Take torch's warning about read-only buffers here, once, silenced.

    ``torch.frombuffer`` warns, once per process, when the buffer is read-only (as
    our map is on purpose): a tensor over it must not be written. That is this
    module's contract, so the warning would only alarm a user. It is raised now,
    at import, from one thread, rather than silenced around every tile, because
    ``warnings.catch_warnings`` changes process-wide state that other threads use.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(bytes(1), dtype=torch.uint8)


_accept_read_only_buffers()


class MappedFile:
    """A whole input file mapped for reading tiles in place (see the module docstring).

    Made by :func:`map_for_tiles`, which checks that the OS can populate it. There is no
    ``close``: every tensor :meth:`tile` returns holds a reference to the map (torch keeps
    the object it was made from), and unmapping under a live tensor would leave it
    pointing at nothing. The file is unmapped when the last of them and this object are
    freed.
    """

    def __init__(self, mapping: mmap.mmap, populate: int, dont_need: int) -> None:
        self._mapping = mapping
        self._populate = populate
        self._dont_need = dont_need
        self.size = len(mapping)

    def tile(self, offset: int, nbytes: int) -> torch.Tensor | None:
        """The file's bytes ``offset:offset + nbytes`` as a uint8 tensor over the map's pages,
        mapped in one call; None where the bytes are not all in the file now (it shrank
        since it was mapped): the caller's positional read then reports it.

        The tensor is valid as long as it is referenced; its pages count in the
        resident set until :meth:`release`, or until the map is freed.
        """
        if nbytes <= 0 or offset < 0 or offset + nbytes > self.size:
            return None
        start, length = _pages_around(offset, nbytes)
        try:
            self._mapping.madvise(self._populate, start, min(length, self.size - start))
        except OSError as err:
            # EFAULT: a page lies past the file's end now, where touching it would
            # raise SIGBUS; the positional read says the file was truncated.
            if err.errno in (errno.EFAULT, errno.EIO, errno.ENOMEM):
                return None
            raise
        return torch.frombuffer(self._mapping, dtype=torch.uint8, count=nbytes, offset=offset)

    def release(self, offset: int, nbytes: int) -> None:
        """Drop the pages of bytes ``offset:offset + nbytes`` from our resident set.

        Only the map's page-table entries go: the page cache keeps the pages, and a
        tile still in use is mapped again on its next touch, with the same bytes.
        """
        # Populating maps whole page-cache folios, so pages just outside the tile (up
        # to a folio on either side) may be mapped too: release the aligned span
        # around it, or those pages would stay in our resident set, a few at every
        # tile boundary. A neighbour's tile still in use is only mapped again.
        start = offset - offset % _RELEASE_ALIGNMENT
        end = offset + nbytes + (-(offset + nbytes)) % _RELEASE_ALIGNMENT
        length = min(end, self.size) - start
        if length > 0:
            with contextlib.suppress(OSError, ValueError):
                self._mapping.madvise(self._dont_need, start, length)


class ThreadTiles:
    """Tiles read in place by several threads, each thread keeping only its last one mapped.

    :meth:`read` releases the calling thread's previous tile before mapping the next,
    so a thread holds one tile's pages at a time. A thread that ends releases its tile
    too (its thread-local value is freed), and :meth:`release_all` releases every
    thread's: a run makes a pool of threads per output shard, and a tile kept per
    finished thread would grow with the shard count.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def read(self, mapped: MappedFile, offset: int, nbytes: int) -> torch.Tensor | None:
        """:meth:`MappedFile.tile` for the calling thread, after releasing its last tile."""
        last: _HeldTile | None = getattr(self._local, "tile", None)
        if last is not None:
            self._local.tile = None
            last.release()
        tile = mapped.tile(offset, nbytes)
        if tile is not None:
            self._local.tile = _HeldTile(mapped, offset, nbytes)
        return tile

    def release_all(self) -> None:
        """Release every thread's last tile (their thread-local values are freed)."""
        self._local = threading.local()


class _HeldTile:
    """The pages of one thread's last tile, released once: explicitly, or when freed (the
    thread ended, or :meth:`ThreadTiles.release_all` dropped it)."""

    def __init__(self, mapped: MappedFile, offset: int, nbytes: int) -> None:
        self._mapped: MappedFile | None = mapped
        self._offset, self._nbytes = offset, nbytes

    def release(self) -> None:
        if self._mapped is not None:
            self._mapped.release(self._offset, self._nbytes)
            self._mapped = None

    def __del__(self) -> None:
        self.release()


def map_for_tiles(descriptor: int, size: int) -> MappedFile | None:
    """A read-only view of a whole file for :meth:`MappedFile.tile`, or None where the OS
    cannot populate a map (see the module docstring): the caller then reads positionally.

    Args:
        descriptor: the file, open for reading (never written through the map).
        size: its size in bytes.
    """
    populate, dont_need = POPULATE_READ, _DONT_NEED
    if populate is None or dont_need is None or size <= 0 or not hasattr(mmap.mmap, "madvise"):
        return None
    try:
        mapping = mmap.mmap(descriptor, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError, OverflowError):
        return None
    try:
        # Asked once per file: a kernel before 5.14 refuses the advice (EINVAL).
        mapping.madvise(populate, 0, min(size, mmap.PAGESIZE))
        mapping.madvise(dont_need, 0, min(size, mmap.PAGESIZE))
    except (OSError, ValueError):
        mapping.close()
        return None
    return MappedFile(mapping, populate, dont_need)


def _pages_around(offset: int, nbytes: int) -> tuple[int, int]:
    """The page-aligned start and the length of the pages holding ``offset:offset + nbytes``
    (``madvise`` takes whole pages)."""
    start = offset - offset % mmap.PAGESIZE
    return start, offset + nbytes - start
