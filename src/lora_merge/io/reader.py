"""Lazy, bounded reads of tensors from safetensors files, and in-memory tensor maps.

Both classes answer the same questions (which keys, what dtype and shape, give me
rows i..j) so the planner and the stream do not care where a tensor comes from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from lora_merge.errors import InvalidInputError
from lora_merge.io.safetensors_format import TensorEntry

COPY_CHUNK_BYTES = 16 * 2**20


class TensorSource(Protocol):
    """Anything the stream can read tensors from."""

    def keys(self) -> Iterable[str]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read_rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension (the whole tensor by default)."""
        ...


class SafetensorsReader:
    """Reads tensors from one or more safetensors files, a row range at a time.

    Like mergekit's lazy loader it keeps one file open and switches only when a
    key lives in another file, so a model read in file order opens each shard
    once. Reads are ``readinto`` calls into a fresh buffer of exactly the bytes
    asked for: no mmap, so the pages read do not stay in our resident set.
    """

    def __init__(self, entries: Mapping[str, TensorEntry]) -> None:
        self._entries = dict(entries)
        self._open_path: Path | None = None
        self._handle: BinaryIO | None = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the open file, if any."""
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._open_path = None

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def entry(self, key: str) -> TensorEntry:
        """The file location of a key."""
        return self._entries[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def read_rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        entry = self._entries[key]
        rows = entry.shape[0] if entry.shape else 1
        stop = rows if stop is None else stop
        if entry.shape:
            offset = entry.start + start * entry.row_nbytes
            nbytes = (stop - start) * entry.row_nbytes
            shape = (stop - start, *entry.shape[1:])
        else:
            offset, nbytes, shape = entry.start, entry.nbytes, ()
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._read_exactly(entry, offset, buffer.numpy().data)
        if entry.dtype == torch.uint8:
            return buffer.reshape(shape)
        return buffer.view(entry.dtype).reshape(shape)

    def copy_bytes(self, key: str, destination: BinaryIO) -> int:
        """Append the raw bytes of a tensor to ``destination``; return the count.

        Uses ``os.copy_file_range`` (in-kernel, no copy through Python) where the
        OS has it, else a buffered copy.
        """
        entry = self._entries[key]
        handle = self._switch_to(entry.path)
        destination.flush()
        copied = 0
        if hasattr(os, "copy_file_range"):
            try:
                copied = _copy_file_range(handle, destination, entry.start, entry.nbytes)
            except OSError:
                copied = 0  # e.g. EXDEV on old kernels or EINVAL on some filesystems
                destination.seek(0, os.SEEK_END)
        if copied < entry.nbytes:
            handle.seek(entry.start + copied)
            remaining = entry.nbytes - copied
            while remaining:
                chunk = handle.read(min(COPY_CHUNK_BYTES, remaining))
                if not chunk:
                    raise _shrunk(entry)
                destination.write(chunk)
                remaining -= len(chunk)
        return entry.nbytes

    def _read_exactly(self, entry: TensorEntry, offset: int, target: memoryview) -> None:
        handle = self._switch_to(entry.path)
        handle.seek(offset)
        done = 0
        while done < len(target):
            count = handle.readinto(target[done:])  # type: ignore[attr-defined]
            if not count:
                raise _shrunk(entry)
            done += count

    def _switch_to(self, path: Path) -> BinaryIO:
        if self._open_path != path or self._handle is None:
            self.close()
            try:
                self._handle = open(path, "rb")  # noqa: SIM115 - kept open across calls
            except OSError as err:
                raise InvalidInputError(f"cannot read {path}: {err.strerror or err}") from err
            self._open_path = path
        return self._handle


def _copy_file_range(source: BinaryIO, destination: BinaryIO, start: int, nbytes: int) -> int:
    """Copy with the kernel; returns the bytes copied (may stop early at EOF)."""
    destination_offset = destination.tell()
    copied = 0
    while copied < nbytes:
        count = os.copy_file_range(
            source.fileno(),
            destination.fileno(),
            nbytes - copied,
            start + copied,
            destination_offset + copied,
        )
        if count == 0:
            break
        copied += count
    destination.seek(destination_offset + copied)
    return copied


def _shrunk(entry: TensorEntry) -> InvalidInputError:
    return InvalidInputError(
        f"{entry.path} ended while reading tensor {entry.name!r}: the file was truncated "
        "or changed while lora-merge was reading it"
    )


class InMemoryTensors:
    """A ``TensorSource`` over tensors already in memory (a small pickled adapter)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read_rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor if tensor.dim() == 0 else tensor[start:stop]
