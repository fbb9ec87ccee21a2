"""Writing a safetensors file whose tensor list is known before its first byte.

The plan fixes every output tensor's name, dtype and shape up front, so the
header (with all offsets) is written first and the data is then streamed in
order, chunk by chunk, without ever holding a whole tensor or shard.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_merge.errors import OutputError
from lora_merge.io.reader import StoredTensorSource
from lora_merge.io.safetensors_format import (
    METADATA_KEY,
    SAFETENSORS_NAME_BY_TORCH_DTYPE,
    dtype_itemsize,
)

# safetensors pads the JSON header with spaces so that the data buffer starts
# 8-byte aligned; readers that mmap rely on it.
HEADER_ALIGNMENT = 8
OUTPUT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one output tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_itemsize(self.dtype)


def encode_safetensors_header(
    specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
) -> bytes:
    """The length prefix and padded JSON header for tensors stored in ``specs`` order."""
    header: dict[str, object] = {METADATA_KEY: dict(metadata or OUTPUT_METADATA)}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_NAME_BY_TORCH_DTYPE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


# Writes are issued in pieces of this size: measured here, copying from a
# cache-resident source into the page cache runs ~4x faster in pieces of up
# to a few hundred KiB than in one large write.
WRITE_PIECE_BYTES = 256 * 2**10


class ShardWriter:
    """One safetensors file whose header is written first and whose tensors are filled in after.

    The header fixes every tensor's byte range, so tensors can be written in any
    order, by several threads at once: :meth:`tensor` hands out a
    :class:`TensorSlot` per tensor, and writes are positional (``os.pwrite``) on a
    shared raw descriptor. Leaving the ``with`` block checks that every tensor
    received exactly its planned bytes.
    """

    def __init__(
        self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._specs = {spec.name: spec for spec in specs}
        self._header = encode_safetensors_header(specs, metadata)
        self._offsets: dict[str, int] = {}
        offset = len(self._header)
        for spec in specs:
            self._offsets[spec.name] = offset
            offset += spec.nbytes
        self._completed: set[str] = {spec.name for spec in specs if spec.nbytes == 0}
        self._lock = threading.Lock()
        self._descriptor: int | None = None

    def __enter__(self) -> ShardWriter:
        with write_errors_as_output_errors(self.path):
            self._descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            pwrite_all(self._descriptor, memoryview(self._header), 0)
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        assert self._descriptor is not None
        os.close(self._descriptor)
        self._descriptor = None
        missing = [name for name in self._specs if name not in self._completed]
        if exc_type is None and missing:
            raise RuntimeError(
                f"shard {self.path.name} closed before tensor {missing[0]!r} was written"
            )

    def tensor(self, name: str) -> TensorSlot:
        """The slot to write tensor ``name`` into, front to back."""
        assert self._descriptor is not None, "ShardWriter used outside its with-block"
        return TensorSlot(self, self._specs[name], self._descriptor, self._offsets[name])

    def _complete(self, name: str) -> None:
        with self._lock:
            self._completed.add(name)


class TensorSlot:
    """The byte range of one tensor in a shard, filled by consecutive writes."""

    def __init__(self, shard: ShardWriter, spec: TensorSpec, descriptor: int, offset: int) -> None:
        self.spec = spec
        self._shard = shard
        self._descriptor = descriptor
        self._position = offset
        self._remaining = spec.nbytes

    def write(self, chunk: torch.Tensor) -> int:
        """Append the next rows of the tensor (already in its output dtype); return the bytes."""
        if chunk.dtype != self.spec.dtype:
            raise RuntimeError(
                f"{self.spec.name}: chunk is {chunk.dtype}, planned {self.spec.dtype}"
            )
        nbytes = chunk.numel() * chunk.element_size()
        self._check_room(nbytes)
        if nbytes:
            data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy().data
            with write_errors_as_output_errors(self._shard.path):
                pwrite_all(self._descriptor, data, self._position)
        self._advance(nbytes)
        return nbytes

    def copy_from(self, reader: StoredTensorSource, key: str) -> int:
        """Fill the whole tensor with the stored bytes of ``key``, without decoding them."""
        self._check_room(reader.entry(key).nbytes)
        with write_errors_as_output_errors(self._shard.path):
            copied = reader.copy_bytes(key, self._descriptor, self._position)
        self._advance(copied)
        return copied

    def _check_room(self, nbytes: int) -> None:
        if nbytes > self._remaining:
            raise RuntimeError(f"{self.spec.name}: more bytes written than planned")

    def _advance(self, nbytes: int) -> None:
        self._position += nbytes
        self._remaining -= nbytes
        if self._remaining == 0:
            self._shard._complete(self.spec.name)
            start_writeback(self._descriptor, self._position - self.spec.nbytes, self.spec.nbytes)


def start_writeback(descriptor: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to write a finished byte range to disk now, without waiting.

    ``POSIX_FADV_DONTNEED`` starts write-back of the range and lets the kernel
    drop its pages once clean: we never read them again. The disk then works
    while later tensors are merged, instead of all at the final fsync
    (measured: 3.2 s instead of 3.65 s for a 2.2 GB merge), and the page cache
    is not filled with the output.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(descriptor, offset, nbytes, os.POSIX_FADV_DONTNEED)


def pwrite_all(descriptor: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``, in pieces of :data:`WRITE_PIECE_BYTES`."""
    done = 0
    while done < len(data):
        done += os.pwrite(descriptor, data[done : done + WRITE_PIECE_BYTES], offset + done)


@contextmanager
def write_errors_as_output_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (full disk, quota, I/O error) into the user-facing OutputError."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        else:
            reason = err.strerror or str(err)
        raise OutputError(
            f"writing {path.name} failed: {reason}; nothing was written to OUT "
            "(free some space or choose another OUT)"
        ) from err
