"""A base reader that hands out bitsandbytes-quantized weights dequantized, a row range at a time.

It is a :class:`~lora_merge.io.reader.TensorSource` over the base's *logical*
tensors (see :mod:`lora_merge.io.bitsandbytes_format`): stored tensors pass through
to the :class:`~lora_merge.io.reader.SafetensorsReader`; a quantized weight's
rows are read as the codes and scales that cover them and dequantized, so the
stream merges them exactly as it merges a 16-bit base and memory stays bounded
by the tile size whatever the tensor size.

A row range rarely starts on a quantization block, so the run of elements read
is widened to whole blocks, dequantized, and trimmed: every element depends
only on its own code and its block's scale, so the result has the bits a
whole-tensor dequantization gives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

from lora_merge.compute import bitsandbytes_backend
from lora_merge.compute.dequantize import (
    dequantize_4bit,
    dequantize_int8_rows,
    dequantize_nested_absmax,
)
from lora_merge.io.bitsandbytes_format import FourBitWeight, Int8Weight, LogicalTensor
from lora_merge.io.positional import PositionalFile
from lora_merge.io.reader import StoredTensorSource, checked_row_range
from lora_merge.io.safetensors_format import TensorEntry

DequantizeBackend = Literal["auto", "bitsandbytes", "torch"]


class DequantizingReader:
    """Logical tensors of a base, quantized weights dequantized on ``device``.

    Args:
        stored: reader of every stored tensor of the base (codes and scales included).
        tensors: the base's logical tensors (``BaseCheckpoint.tensors``).
        device: where dequantization runs; rows of quantized weights come back there.
        backend: ``auto`` (bitsandbytes' kernels where they load and run, else
            torch), ``bitsandbytes`` or ``torch``. All give the same bits.
    """

    def __init__(
        self,
        stored: StoredTensorSource,
        tensors: dict[str, LogicalTensor],
        device: torch.device | str = "cpu",
        backend: DequantizeBackend = "auto",
    ) -> None:
        self._stored = stored
        self._tensors = tensors
        self._device = torch.device(device)
        self._backend = backend

    def __enter__(self) -> DequantizingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stored.close()

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def entry(self, key: str) -> TensorEntry:
        """The file location of a stored (never a quantized) tensor."""
        return self._stored.entry(key)

    def prefetch(self, key: str) -> None:
        """Have the disk read a tensor ahead (see :meth:`SafetensorsReader.prefetch`); for a
        quantized weight, its codes and scales."""
        quantized = self._tensors[key].quantized
        if quantized is None:
            self._stored.prefetch(key)
            return
        for name in quantized.stored_names:
            self._stored.prefetch(name)

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int:
        """Copy a stored tensor's bytes (see :meth:`SafetensorsReader.copy_bytes`)."""
        return self._stored.copy_bytes(key, destination, destination_offset)

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        quantized = self._tensors[key].quantized
        if quantized is None:
            return self._stored.read_rows(key, start, stop, buffer)
        stop = checked_row_range(key, quantized.shape[0], start, stop)
        if start == stop or 0 in quantized.shape:  # nothing to read
            return torch.empty((stop - start, *quantized.shape[1:]), dtype=quantized.dtype)
        if isinstance(quantized, Int8Weight):
            return self._int8_rows(quantized, start, stop)
        return self._four_bit_rows(quantized, start, stop)

    def _int8_rows(self, weight: Int8Weight, start: int, stop: int) -> torch.Tensor:
        codes = self._to_device(self._stored.read_rows(weight.weight.name, start, stop))
        scales = self._to_device(self._stored.read_rows(weight.row_scales.name, start, stop))
        if self._backend != "torch":
            values = bitsandbytes_backend.dequantize_int8_with_bitsandbytes(codes, scales)
            if values is not None:
                return values
        return dequantize_int8_rows(codes, scales)

    def _four_bit_rows(self, weight: FourBitWeight, start: int, stop: int) -> torch.Tensor:
        row_elements = math.prod(weight.shape[1:])
        first, last = start * row_elements, stop * row_elements
        # Widen to whole blocks: blocks start on even elements, so on whole bytes.
        block_first = first - first % weight.blocksize
        block_last = min(weight.numel, -(-last // weight.blocksize) * weight.blocksize)
        count = block_last - block_first
        packed = self._stored_bytes(weight.packed, block_first // 2, (block_last + 1) // 2)
        absmax = self._absmax(
            weight, block_first // weight.blocksize, -(-block_last // weight.blocksize)
        )
        values = None
        if self._backend != "torch":
            values = bitsandbytes_backend.dequantize_4bit_with_bitsandbytes(
                packed, absmax, weight.quant_type, weight.blocksize, count, weight.dtype
            )
        if values is None:
            values = dequantize_4bit(
                packed, absmax, weight.quant_type, weight.blocksize, count, weight.dtype
            )
        trimmed = values[first - block_first : last - block_first]
        return trimmed.reshape(stop - start, *weight.shape[1:])

    def _absmax(self, weight: FourBitWeight, first: int, last: int) -> torch.Tensor:
        """Float32 absmax of blocks ``first:last``; nested ones dequantized first."""
        nested = weight.nested
        if nested is None:
            return self._to_device(self._stored.read_rows(weight.absmax.name, first, last))
        block = nested.blocksize
        nested_first = first - first % block
        nested_last = min(weight.absmax.shape[0], -(-last // block) * block)
        codes = self._stored.read_rows(weight.absmax.name, nested_first, nested_last)
        scales = self._stored.read_rows(
            nested.nested_absmax.name, nested_first // block, -(-nested_last // block)
        )
        code = self._stored.read_rows(nested.nested_quant_map.name)
        codes, scales, code = (self._to_device(t) for t in (codes, scales, code))
        absmax = None
        if self._backend != "torch":
            absmax = bitsandbytes_backend.dequantize_nested_absmax_with_bitsandbytes(
                codes, scales, code, block, nested.offset
            )
        if absmax is None:
            absmax = dequantize_nested_absmax(codes, scales, code, block, nested.offset)
        return absmax[first - nested_first : last - nested_first]

    def _stored_bytes(self, entry: TensorEntry, first: int, last: int) -> torch.Tensor:
        """Bytes ``first:last`` of a stored tensor of any dtype (bnb_4bit_quant_storage)."""
        row_bytes = entry.row_nbytes
        rows = self._stored.read_rows(entry.name, first // row_bytes, -(-last // row_bytes))
        raw = rows.reshape(-1).view(torch.uint8) if rows.dtype != torch.uint8 else rows.reshape(-1)
        offset = first - (first // row_bytes) * row_bytes
        return self._to_device(raw[offset : offset + last - first])

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move freshly read bytes to the device: on CUDA via pinned memory, without blocking
        (the copy overlaps the next read; torch orders it before the kernels that use it)."""
        if self._device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self._device, non_blocking=True)
