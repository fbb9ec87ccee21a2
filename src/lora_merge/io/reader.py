"""Lazy, bounded reads of tensors from safetensors files, and in-memory tensor maps.

Both classes answer the same questions (which keys, what dtype and shape, give me
rows i..j) so the planner and the stream do not care where a tensor comes from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from lora_merge.errors import InvalidInputError
from lora_merge.io.safetensors_format import TensorEntry

COPY_CHUNK_BYTES = 16 * 2**20
_COPY_FILE_RANGE_UNSUPPORTED = (
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    errno.EBADF,
)


class TensorSource(Protocol):
    """Anything the stream can read tensors from."""

    def keys(self) -> Iterable[str]: ...

    def close(self) -> None: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension (the whole tensor by default).

        ``buffer`` (uint8, at least the bytes asked for) may be reused between
        calls to avoid allocating; the result may then be a view of it.
        """
        ...


class StoredTensorSource(TensorSource, Protocol):
    """A tensor source backed by files, whose stored tensors can be copied byte for byte."""

    def entry(self, key: str) -> TensorEntry: ...

    def prefetch(self, key: str) -> None: ...

    def copy_bytes(self, key: str, destination: int, destination_offset: int) -> int: ...


class SafetensorsReader:
    """Reads tensors from one or more safetensors files, a row range at a time.

    Reads are positional (``os.preadv``) into a fresh buffer of exactly the
    bytes asked for: no mmap, so the pages read do not stay in our resident set,
    and no shared file position, so a reading thread and a copying thread can
    use one reader at once. Each file is opened once, on first use.
    """

    def __init__(self, entries: Mapping[str, TensorEntry]) -> None:
        self._entries = dict(entries)
        self._descriptors: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file opened so far."""
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def entry(self, key: str) -> TensorEntry:
        """The file location of a key."""
        return self._entries[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        entry = self._entries[key]
        stop = checked_row_range(key, entry.shape[0] if entry.shape else 1, start, stop)
        if entry.shape:
            offset = entry.start + start * entry.row_nbytes
            nbytes = (stop - start) * entry.row_nbytes
            shape = (stop - start, *entry.shape[1:])
        else:
            offset, nbytes, shape = entry.start, entry.nbytes, ()
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        buffer = buffer[:nbytes]
        target = buffer.numpy().data
        done = 0
        while done < nbytes:
            count = os.preadv(self._descriptor(entry.path), [target[done:]], offset + done)
            if not count:
                raise _shrunk(entry)
            done += count
        if entry.dtype == torch.uint8:
            return buffer.reshape(shape)
        return buffer.view(entry.dtype).reshape(shape)

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now, in the background.

        A hint (``POSIX_FADV_WILLNEED``): while the threads merge the tensors at
        hand, the disk is already reading the next one, so reading overlaps the
        arithmetic without a queue of our own. Bounded by one tensor per thread.
        """
        entry = self._entries[key]
        if not hasattr(os, "posix_fadvise") or not entry.nbytes:
            return
        # Only a hint: on a filesystem that does not take it, reads happen on demand.
        with contextlib.suppress(OSError):
            os.posix_fadvise(
                self._descriptor(entry.path), entry.start, entry.nbytes, os.POSIX_FADV_WILLNEED
            )

    def copy_bytes(self, key: str, destination: int, destination_offset: int) -> int:
        """Copy the raw bytes of a tensor into a file descriptor at an offset; return the count.

        Uses ``os.copy_file_range`` (in-kernel, the data never enters Python)
        where the OS has it, else a positional buffered copy.
        """
        entry = self._entries[key]
        source = self._descriptor(entry.path)
        copied = 0
        if hasattr(os, "copy_file_range"):
            try:
                while copied < entry.nbytes:
                    count = os.copy_file_range(
                        source,
                        destination,
                        entry.nbytes - copied,
                        entry.start + copied,
                        destination_offset + copied,
                    )
                    if count == 0:
                        raise _shrunk(entry)
                    copied += count
            except OSError as err:
                # EXDEV on old kernels, EINVAL/ENOSYS/EOPNOTSUPP on some filesystems:
                # copy below instead. A full disk is not something to retry.
                if err.errno not in _COPY_FILE_RANGE_UNSUPPORTED:
                    raise
        while copied < entry.nbytes:
            chunk = os.pread(
                source, min(COPY_CHUNK_BYTES, entry.nbytes - copied), entry.start + copied
            )
            if not chunk:
                raise _shrunk(entry)
            copied += os.pwrite(destination, chunk, destination_offset + copied)
        return entry.nbytes

    def _descriptor(self, path: Path) -> int:
        descriptor = self._descriptors.get(path)
        if descriptor is None:
            with self._lock:
                descriptor = self._descriptors.get(path)
                if descriptor is None:
                    try:
                        descriptor = os.open(path, os.O_RDONLY)
                    except OSError as err:
                        raise InvalidInputError(
                            f"cannot read {path}: {err.strerror or err}"
                        ) from err
                    self._descriptors[path] = descriptor
        return descriptor


def checked_row_range(key: str, rows: int, start: int, stop: int | None) -> int:
    """The end of the row range ``start:stop`` of a tensor of ``rows`` rows (None: the last).

    Raises:
        ValueError: the range is not inside the tensor. A caller bug, never user input:
            refuse rather than read a neighbour's bytes.
    """
    stop = rows if stop is None else stop
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows {start}:{stop} are outside {key!r}, which has {rows}")
    return stop


def _shrunk(entry: TensorEntry) -> InvalidInputError:
    return InvalidInputError(
        f"{entry.path} ended while reading tensor {entry.name!r}: the file was truncated "
        "or changed while lora-merge was reading it"
    )


class InMemoryTensors:
    """A ``TensorSource`` over tensors already in memory (a small pickled adapter)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def close(self) -> None:
        """Nothing to release."""

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor if tensor.dim() == 0 else tensor[start:stop]
