"""Lazy, bounded reads of tensors from safetensors files, and in-memory tensor maps.

Both classes answer the same questions (which keys, what dtype and shape, give me
rows i..j) so the planner and the stream do not care where a tensor comes from.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lora_merge.dtypes import U8, DType, dtype_of
from lora_merge.errors import InvalidInputError
from lora_merge.io.positional import PositionalFile
from lora_merge.io.read_pacing import ReadPacing
from lora_merge.io.safetensors_format import TensorEntry

if TYPE_CHECKING:  # a plan reads keys, dtypes and shapes before torch is imported
    import torch


class TensorSource(Protocol):
    """Anything the stream can read tensors from."""

    def keys(self) -> Iterable[str]: ...

    def close(self) -> None: ...

    def dtype(self, key: str) -> DType: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension (the whole tensor by default).

        ``buffer`` (uint8, at least the bytes asked for) may be reused between
        calls to avoid allocating; the result may then be a view of it.
        """
        ...

    def working_bytes(self, key: str) -> int:
        """Memory a thread holds while it reads ``key``, beyond the tensor read."""
        ...

    def held_bytes(self, workers: int) -> int:
        """Memory the source holds all run long while ``workers`` threads read from it."""
        ...


@runtime_checkable
class SubrowSource(TensorSource, Protocol):
    """A tensor source that reads part of one row of a tensor of 3 or more dimensions.

    A row of a fused expert weight (E, X, Y) is a whole expert, tens of MB in
    real models: more than a cache-sized tile. Reading it a band of its own rows
    (``X``) at a time keeps tiles bounded by the tile budget, not the expert.
    """

    def read_subrows(
        self,
        key: str,
        row: int,
        start: int,
        stop: int,
        buffer: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``tensor[row, start:stop]``, shape ``(stop - start, *shape[2:])``; ``buffer`` as in
        :meth:`TensorSource.read_rows`.

        ``compute_dtype`` is the dtype the caller widens the values to (the merge's float32):
        a quantized weight whose decoded values that dtype holds exactly may come back in it,
        sparing the rounding to its own dtype and the widening back (MXFP4 into float32: see
        :meth:`lora_merge.io.formats.mxfp4.Mxfp4Weight.read_subrows`). The values are the
        same either way; the result's dtype says which was done.
        """
        ...


class StoredTensorSource(SubrowSource, Protocol):
    """A tensor source backed by files, whose stored tensors can be copied byte for byte."""

    def entry(self, key: str) -> TensorEntry: ...

    def prefetch(self, key: str) -> None: ...

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int: ...

    def read_row_bytes(
        self, key: str, start: int, stop: int, first: int, last: int, buffer: torch.Tensor | None
    ) -> torch.Tensor: ...


# What one read call costs, in bytes a memory copy moves in that time: a Python-level
# positional read of a few bytes takes ~12 us (measured, 2 cores), a copy from the page
# cache moves ~64 KiB in that time. read_row_bytes reads whole rows below it.
BYTES_PER_READ_CALL = 64 * 2**10


class EntryReader:
    """What every reader of stored safetensors entries shares: the entries and ``read_rows``.

    A subclass says how bytes are read (:meth:`_read_exactly`): from a local file
    (:class:`SafetensorsReader`) or by range requests
    (:class:`lora_merge.io.http_reader.RangedTensorReader`).
    """

    def __init__(self, entries: Mapping[str, TensorEntry]) -> None:
        self._entries = dict(entries)

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def working_bytes(self, key: str) -> int:
        """Nothing beyond the tensor read."""
        return 0

    def held_bytes(self, workers: int) -> int:
        """Nothing: tensors are read when asked for, a tile at a time."""
        return 0

    def entry(self, key: str) -> TensorEntry:
        """The file location of a key."""
        return self._entries[key]

    def dtype(self, key: str) -> DType:
        return self._entries[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        import torch  # reading values: the stream has imported it

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
        if nbytes and not self._read_exactly(entry, offset, buffer.numpy().data):
            raise _shrunk(entry)
        if entry.dtype == U8:
            return buffer.reshape(shape)
        return buffer.view(entry.dtype.torch).reshape(shape)

    def read_subrows(
        self,
        key: str,
        row: int,
        start: int,
        stop: int,
        buffer: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``tensor[row, start:stop]`` of a tensor of 3 or more dimensions (see
        :class:`SubrowSource`): consecutive bytes of the file, read as :meth:`read_rows`, in
        the stored dtype whatever ``compute_dtype``."""
        import torch

        entry = self._entries[key]
        checked_row_range(key, entry.shape[0], row, row + 1)
        stop = checked_row_range(f"{key}[{row}]", entry.shape[1], start, stop)
        subrow_nbytes = entry.row_nbytes // entry.shape[1]
        offset = entry.start + row * entry.row_nbytes + start * subrow_nbytes
        nbytes = (stop - start) * subrow_nbytes
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        buffer = buffer[:nbytes]
        if nbytes and not self._read_exactly(entry, offset, buffer.numpy().data):
            raise _shrunk(entry)
        values = buffer if entry.dtype == U8 else buffer.view(entry.dtype.torch)
        return values.reshape(stop - start, *entry.shape[2:])

    def read_row_bytes(
        self, key: str, start: int, stop: int, first: int, last: int, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """Bytes ``first:last`` of each of rows ``start:stop``, as uint8 ``(stop - start,
        last - first)``: a band of columns of a tensor stored column-major for its users
        (GPTQ's and AWQ's ``qweight`` hold a weight's rows as their columns).

        Whichever costs less: one read per row (only the band's bytes) when a row is
        wider than the band by more than :data:`BYTES_PER_READ_CALL`, else whole rows
        in one read (the result is then a view of them). ``buffer`` as in :meth:`read_rows`.
        """
        import torch

        entry = self._entries[key]
        stop = checked_row_range(key, entry.shape[0] if entry.shape else 1, start, stop)
        row_bytes = entry.row_nbytes
        if not 0 <= first <= last <= row_bytes:
            raise ValueError(f"bytes {first}:{last} of rows of {row_bytes} bytes")
        if row_bytes - (last - first) <= BYTES_PER_READ_CALL:
            rows = self.read_rows(key, start, stop, buffer)
            return rows.reshape(stop - start, -1).view(torch.uint8)[:, first:last]
        width = last - first
        nbytes = (stop - start) * width
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        band = buffer[:nbytes].view(stop - start, width)
        for row in range(start, stop):
            offset = entry.start + row * row_bytes + first
            if width and not self._read_exactly(entry, offset, band[row - start].numpy().data):
                raise _shrunk(entry)
        return band

    def _read_exactly(self, entry: TensorEntry, offset: int, target: memoryview) -> bool:
        """Fill ``target`` from ``offset`` of the entry's file; False if the file ended first."""
        raise NotImplementedError


class SafetensorsReader(EntryReader):
    """Reads tensors from one or more safetensors files, a row range at a time.

    Reads are positional (:class:`~lora_merge.io.positional.PositionalFile`) into
    a buffer of exactly the bytes asked for: no mmap, so the pages read do not
    stay in our resident set, and a reading thread and a copying thread can use
    one reader at once. Each file is opened once, on first use.

    Args:
        entries: the stored tensors' locations.
        pacing: told which bytes of each file have been read, so that the hashing of
            the inputs follows the reads (see
            :mod:`lora_merge.io.read_pacing`); None: nobody follows.
    """

    def __init__(
        self, entries: Mapping[str, TensorEntry], pacing: ReadPacing | None = None
    ) -> None:
        super().__init__(entries)
        self._files: dict[Path, PositionalFile] = {}
        self._reads: dict[Path, Callable[[int, int], None]] = {}
        self._pacing = pacing
        self._lock = threading.Lock()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file opened so far."""
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files.clear()

    def _read_exactly(self, entry: TensorEntry, offset: int, target: memoryview) -> bool:
        complete = self._file(entry.path).read_exactly_into(target, offset)
        self._reads[entry.path](offset, len(target))
        return complete

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now, in the background.

        A hint (``POSIX_FADV_WILLNEED``): while the threads merge the tensors at
        hand, the disk is already reading the next one, so reading overlaps the
        arithmetic without a queue of our own. Bounded by one tensor per thread.
        """
        entry = self._entries[key]
        if entry.nbytes:
            self._file(entry.path).will_need(entry.start, entry.nbytes)

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int:
        """Copy the raw bytes of a tensor into ``destination`` at an offset; return the count.

        In the kernel where the OS allows it (see :meth:`PositionalFile.copy_to`):
        the data never enters Python.
        """
        entry = self._entries[key]
        copied = self._file(entry.path).copy_to(
            destination, entry.nbytes, entry.start, destination_offset
        )
        self._reads[entry.path](entry.start, copied)
        if copied != entry.nbytes:
            raise _shrunk(entry)
        return copied

    def _file(self, path: Path) -> PositionalFile:
        file = self._files.get(path)
        if file is None:
            with self._lock:
                file = self._files.get(path)
                if file is None:
                    try:
                        file = PositionalFile(path)
                    except OSError as err:
                        raise InvalidInputError(
                            f"cannot read {path}: {err.strerror or err}"
                        ) from err
                    self._reads[path] = (
                        self._pacing.reads_of(file.descriptor) if self._pacing else _no_pacing
                    )
                    self._files[path] = file
        return file


def _no_pacing(start: int, nbytes: int) -> None:
    """Reads that nobody follows: nothing to report."""


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

    def working_bytes(self, key: str) -> int:
        """Nothing beyond the tensor read."""
        return 0

    def held_bytes(self, workers: int) -> int:
        """Every tensor: a pickled adapter is loaded whole."""
        return sum(
            self.dtype(key).itemsize * math.prod(self.shape(key)) for key in list(self.keys())
        )

    def dtype(self, key: str) -> DType:
        return dtype_of(self._tensors[key].dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor if tensor.dim() == 0 else tensor[start:stop]

    def read_subrows(
        self,
        key: str,
        row: int,
        start: int,
        stop: int,
        buffer: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        return self._tensors[key][row, start:stop]
