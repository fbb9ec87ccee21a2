"""Writing a safetensors file whose tensor list is known before its first byte.

The plan fixes every output tensor's name, dtype and shape up front, so the
header (with all offsets) is written first and the data is then streamed in
order, chunk by chunk, without ever holding a whole tensor or shard.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_merge.dtypes import DType
from lora_merge.io.positional import PositionalFile, write_errors_as_output_errors
from lora_merge.io.safetensors_header import HeaderTensor, encode_header

if TYPE_CHECKING:  # the plan's TensorSpec is made before torch is imported
    import torch

    from lora_merge.io.reader import StoredTensorSource


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one output tensor."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def encode_safetensors_header(
    specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
) -> bytes:
    """The length prefix and padded JSON header for tensors stored in ``specs`` order."""
    return encode_header(
        [HeaderTensor(spec.name, spec.dtype.name, spec.shape, spec.nbytes) for spec in specs],
        metadata,
    )


class ShardWriter:
    """One safetensors file whose header is written first and whose tensors are filled in after.

    The header fixes every tensor's byte range, so tensors can be written in any
    order, by several threads at once: :meth:`tensor` hands out a
    :class:`TensorSlot` per tensor, and writes are positional on one shared
    :class:`~lora_merge.io.positional.PositionalFile`. Leaving the ``with`` block checks that every tensor
    received exactly its planned bytes.
    """

    def __init__(
        self,
        path: Path,
        specs: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
        written: Collection[str] = (),
    ) -> None:
        self.path = path
        self._specs = {spec.name: spec for spec in specs}
        self._header = encode_safetensors_header(specs, metadata)
        # Tensors already in the file, under this very header (copied before torch was
        # imported, see lora_merge.run.copy_ahead): kept, so the file is not truncated.
        self._written = frozenset(written)
        self._offsets: dict[str, int] = {}
        offset = len(self._header)
        for spec in specs:
            self._offsets[spec.name] = offset
            offset += spec.nbytes
        self._completed: set[str] = {spec.name for spec in specs if spec.nbytes == 0}
        self._completed |= self._written
        self._lock = threading.Lock()
        self._file: PositionalFile | None = None

    def __enter__(self) -> ShardWriter:
        with write_errors_as_output_errors(self.path):
            self._file = PositionalFile(self.path, writable=True, truncate=not self._written)
            self._file.write_all(memoryview(self._header), 0)
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        missing = [name for name in self._specs if name not in self._completed]
        if exc_type is None and missing:
            raise RuntimeError(
                f"shard {self.path.name} closed before tensor {missing[0]!r} was written"
            )

    def tensor(self, name: str) -> TensorSlot:
        """The slot to write tensor ``name`` into, front to back."""
        assert self._file is not None, "ShardWriter used outside its with-block"
        return TensorSlot(self, self._specs[name], self._file, self._offsets[name])

    def _complete(self, name: str) -> None:
        with self._lock:
            self._completed.add(name)


class TensorSlot:
    """The byte range of one tensor in a shard, filled by consecutive writes."""

    def __init__(
        self, shard: ShardWriter, spec: TensorSpec, file: PositionalFile, offset: int
    ) -> None:
        self.spec = spec
        self._shard = shard
        self._file = file
        self._position = offset
        self._remaining = spec.nbytes

    def write(self, chunk: torch.Tensor) -> int:
        """Append the next rows of the tensor (already in its output dtype); return the bytes."""
        import torch  # a chunk is a tensor: torch is imported already

        if chunk.dtype != self.spec.dtype.torch:
            raise RuntimeError(
                f"{self.spec.name}: chunk is {chunk.dtype}, planned {self.spec.dtype}"
            )
        nbytes = chunk.numel() * chunk.element_size()
        self._check_room(nbytes)
        if nbytes:
            data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy().data
            with write_errors_as_output_errors(self._shard.path):
                self._file.write_all(data, self._position)
        self._advance(nbytes)
        return nbytes

    def copy_from(self, reader: StoredTensorSource, key: str) -> int:
        """Fill the whole tensor with the stored bytes of ``key``, without decoding them."""
        self._check_room(reader.entry(key).nbytes)
        with write_errors_as_output_errors(self._shard.path):
            copied = reader.copy_bytes(key, self._file, self._position)
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
            # The disk writes the finished tensor back while later ones are merged.
            self._file.done_with(self._position - self.spec.nbytes, self.spec.nbytes)
