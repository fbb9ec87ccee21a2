"""``--save-method merged_native`` for FP8 bases: merged weights quantized back to FP8.

- Block-wise (``quant_method: fp8``): transformers' fine-grained FP8 quantizer
  (``Fp8Quantize._quantize_one``; :func:`~lora_merge.compute.fp8.quantize_fp8_blocks`),
  a block row at a time: the merged rows are gathered until they fill a row of
  blocks (``weight_block_size[0]`` rows), quantized, and their codes written;
  the block scales (1/16384 of the weight at 128x128) are kept and written last.
  Each block is quantized on its own, so the result is the whole-tensor
  quantization's. Fused expert tensors come a whole expert per tile.
- compressed-tensors per channel: its quantizer
  (:func:`~lora_merge.compute.fp8.quantize_fp8_channels`), each tile on its own,
  the scales (one per row) written last.

The merged rows arrive rounded to the model's dtype (the 16-bit merge), so the
codes are the reference quantizer's applied to the ``merged_16bit`` result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lora_merge.compute.fp8 import quantize_fp8_blocks, quantize_fp8_channels
from lora_merge.io.shard_writer import ShardWriter, TensorSpec


@dataclass(frozen=True)
class Fp8BlockNative:
    """How one merged weight is written block-wise FP8 (a
    :class:`~lora_merge.io.formats.protocol.NativeTarget`).

    Attributes:
        shape: the weight's shape, ``(*experts, rows, cols)``.
        dtype: the merged values' dtype (the model's).
        block: ``(bm, bn)``.
        scale_name: the stored name of its ``weight_scale_inv``.
        power_of_two_scales: ``scale_fmt: ue8m0``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    block: tuple[int, int]
    scale_name: str
    power_of_two_scales: bool = False

    @property
    def grid(self) -> tuple[int, ...]:
        rows, cols = self.shape[-2:]
        return (*self.shape[:-2], -(-rows // self.block[0]), -(-cols // self.block[1]))

    def stored_specs(self, name: str) -> list[TensorSpec]:
        return [
            TensorSpec(name, torch.float8_e4m3fn, self.shape),
            TensorSpec(self.scale_name, torch.float32, self.grid),
        ]

    def held_bytes(self, tile_budget: int) -> int:
        """What one quantization holds per element (the gathered rows twice, their padded
        float32 copy, its magnitudes and scaled values, the codes) over a row of blocks (a
        whole expert for fused experts), a tile joined to the remainder, and the weight's
        block scales."""
        rows = self.grid[-2] * self.block[0] if len(self.shape) > 2 else self.block[0]
        padded = rows * self.grid[-1] * self.block[1]
        per_element = 2 * self.dtype.itemsize + 4 + 4 + 4 + 1
        return per_element * padded + 2 * tile_budget + 4 * math.prod(self.grid)

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        slot = writer.tensor(name)
        scales: list[torch.Tensor] = []
        block_rows = self.block[0]
        pending = torch.empty((0, self.shape[-1]), dtype=self.dtype)
        for tile in tiles:
            tile = tile.to("cpu", self.dtype)
            if len(self.shape) > 2:  # whole experts: each its own matrix
                for matrix in tile:
                    codes, inv = self._quantize(matrix)
                    on_bytes(slot.write(codes.unsqueeze(0)))
                    scales.append(inv.unsqueeze(0))
                continue
            values = torch.cat((pending, tile)) if pending.numel() else tile
            whole = values.shape[0] - values.shape[0] % block_rows
            if whole:
                codes, inv = self._quantize(values[:whole])
                on_bytes(slot.write(codes))
                scales.append(inv)
            pending = values[whole:].clone()
        if pending.shape[0]:  # the last, partial row of blocks
            codes, inv = self._quantize(pending)
            on_bytes(slot.write(codes))
            scales.append(inv)
        on_bytes(writer.tensor(self.scale_name).write(torch.cat(scales).reshape(self.grid)))

    def _quantize(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_blocks(matrix, self.block, self.power_of_two_scales)


@dataclass(frozen=True)
class Fp8ChannelNative:
    """How one merged weight is written FP8 with a scale per output channel, as
    compressed-tensors quantizes it.

    Attributes:
        shape: ``(rows, cols)``.
        dtype: the scales' dtype, which compressed-tensors computes in (the model's).
        scale_name: the stored name of its ``weight_scale``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    scale_name: str

    def stored_specs(self, name: str) -> list[TensorSpec]:
        return [
            TensorSpec(name, torch.float8_e4m3fn, self.shape),
            TensorSpec(self.scale_name, self.dtype, (self.shape[0], 1)),
        ]

    def held_bytes(self, tile_budget: int) -> int:
        """The quotient and codes of a tile, and the weight's scales."""
        return 2 * tile_budget + 2 * self.dtype.itemsize * self.shape[0]

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        slot = writer.tensor(name)
        scales = []
        for tile in tiles:
            codes, tile_scales = quantize_fp8_channels(tile.to("cpu", self.dtype))
            on_bytes(slot.write(codes))
            scales.append(tile_scales)
        on_bytes(writer.tensor(self.scale_name).write(torch.cat(scales)))
