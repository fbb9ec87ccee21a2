"""Writing a safetensors file whose tensor list is known before its first byte.

The plan fixes every output tensor's name, dtype and shape up front, so the
header (with all offsets) is written first and the data is then streamed in
order, chunk by chunk, without ever holding a whole tensor or shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_merge.io.reader import SafetensorsReader
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
    """Streams the data of one safetensors file, tensor after tensor, in plan order.

    Use as a context manager. Call :meth:`write` with consecutive row chunks of
    the current tensor, or :meth:`copy_from` to copy a stored tensor's bytes;
    the writer checks that each tensor gets exactly its planned bytes and moves
    on to the next by itself. Writes are positional on a raw descriptor.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec]) -> None:
        self.path = path
        self._specs = list(specs)
        self._index = 0
        self._written_in_tensor = 0
        self._descriptor: int | None = None
        self._position = 0

    def __enter__(self) -> ShardWriter:
        self._descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        header = encode_safetensors_header(self._specs)
        self._pwrite_all(memoryview(header))
        self._skip_empty_tensors()
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        assert self._descriptor is not None
        os.close(self._descriptor)
        self._descriptor = None
        if exc_type is None and self._index != len(self._specs):
            missing = self._specs[self._index].name
            raise RuntimeError(
                f"shard {self.path.name} closed before tensor {missing!r} was written"
            )

    @property
    def current(self) -> TensorSpec:
        """The tensor whose bytes are expected next."""
        return self._specs[self._index]

    def write(self, chunk: torch.Tensor) -> None:
        """Append a chunk of the current tensor (already in its output dtype)."""
        if chunk.dtype != self.current.dtype:
            raise RuntimeError(
                f"{self.current.name}: chunk is {chunk.dtype}, planned {self.current.dtype}"
            )
        chunk = chunk.contiguous()
        if chunk.numel():
            self._pwrite_all(chunk.reshape(-1).view(torch.uint8).numpy().data)
        self._advance(chunk.numel() * chunk.element_size())

    def copy_from(self, reader: SafetensorsReader, key: str) -> int:
        """Append the stored bytes of ``key`` (the whole current tensor) without decoding them."""
        assert self._descriptor is not None, "ShardWriter used outside its with-block"
        copied = reader.copy_bytes(key, self._descriptor, self._position)
        self._position += copied
        self._advance(copied)
        return copied

    def _pwrite_all(self, data: memoryview) -> None:
        assert self._descriptor is not None, "ShardWriter used outside its with-block"
        done = 0
        while done < len(data):
            done += os.pwrite(
                self._descriptor, data[done : done + WRITE_PIECE_BYTES], self._position + done
            )
        self._position += done

    def _advance(self, nbytes: int) -> None:
        self._written_in_tensor += nbytes
        expected = self.current.nbytes
        if self._written_in_tensor > expected:
            raise RuntimeError(f"{self.current.name}: more bytes written than planned")
        if self._written_in_tensor == expected:
            self._index += 1
            self._written_in_tensor = 0
            self._skip_empty_tensors()

    def _skip_empty_tensors(self) -> None:
        # A zero-byte tensor is complete as soon as it becomes current.
        while self._index < len(self._specs) and self._specs[self._index].nbytes == 0:
            self._index += 1
