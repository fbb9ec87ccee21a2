"""``--save-method merged_native`` for FP8 bases: merged weights quantized back to FP8.

- Block-wise (``quant_method: fp8``): transformers' fine-grained FP8 quantizer
  (``Fp8Quantize._quantize_one``; :func:`~lora_merge.compute.fp8.quantize_fp8_blocks`),
  a block row at a time: the merged rows are gathered until they fill a row of
  blocks (``weight_block_size[0]`` rows), quantized, and their codes written;
  the block scales (1/16384 of the weight at 128x128) are kept and written last.
  Each block is quantized on its own, so the result is the whole-tensor
  quantization's. Fused expert tensors are a matrix per expert: their tiles
  hold whole experts, or bands of one expert's rows when an expert is wider
  than a tile, joined into rows of blocks the same way.
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

from lora_merge.compute.fp8 import (
    FP8_QUANTIZE_CHUNK_ELEMENTS,
    quantize_fp8_blocks,
    quantize_fp8_channels,
)
from lora_merge.dtypes import F8_E4M3, F32, dtype_of
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
            TensorSpec(name, F8_E4M3, self.shape),
            TensorSpec(self.scale_name, F32, self.grid),
        ]

    def held_bytes(self, tile_budget: int) -> int:
        """What one quantization holds per element (the gathered rows twice, their padded
        float32 copy, its magnitudes and scaled values, the codes) over a run of block
        columns (:data:`FP8_QUANTIZE_CHUNK_ELEMENTS` values, or one block column of the
        rows quantized at once: a row of blocks, or the whole rows of blocks of a tile),
        the codes of a row of blocks or of a tile, the row of blocks joined from tiles,
        and the weight's block scales (every expert's, for fused experts)."""
        block_rows, block_cols = self.block
        cols = self.shape[-1]
        row_of_blocks = block_rows * cols
        tile_rows = -(-tile_budget // (self.dtype.itemsize * cols) // block_rows) * block_rows
        run = max(FP8_QUANTIZE_CHUNK_ELEMENTS, max(block_rows, tile_rows) * block_cols)
        per_element = 2 * self.dtype.itemsize + 4 + 4 + 4 + 1
        joined = self.dtype.itemsize * row_of_blocks
        codes = max(row_of_blocks, tile_budget)
        return per_element * run + codes + joined + 2 * tile_budget + 4 * math.prod(self.grid)

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        slot = writer.tensor(name)
        rows, cols = self.shape[-2:]
        block_rows = self.block[0]
        # The block scales, filled a row of blocks at a time. One tensor, allocated first:
        # a list of small scale tensors, each allocated between two quantizations' large
        # transient ones, would pin the allocator's heap (DeepSeek-V3's q_b_proj, 192
        # rows of blocks: 90 MB of resident memory more, measured).
        inv_scales = torch.empty(self.grid, dtype=torch.float32)
        scale_rows = inv_scales.view(-1, self.grid[-1])
        scales_done = 0

        def quantize(values: torch.Tensor) -> None:
            nonlocal scales_done
            codes, inv = self._quantize(values)
            on_bytes(slot.write(codes))
            scale_rows[scales_done : scales_done + inv.shape[0]].copy_(inv)
            scales_done += inv.shape[0]

        # The weight's rows arrive in order, in tiles of whole rows or (fused experts: a
        # matrix each) of whole matrices or bands of one matrix's rows. A row of blocks
        # never spans two matrices: the rows are counted within their matrix (``done``),
        # and each matrix's last row of blocks may be partial. Rows of blocks a tile cuts
        # are joined in one buffer, reused.
        joined = torch.empty((0, cols), dtype=self.dtype)
        filled = 0  # rows in ``joined``
        done = 0  # rows of the current matrix quantized
        for tile in tiles:
            values = tile.to("cpu", self.dtype).reshape(-1, cols)
            offset = 0
            while offset < values.shape[0]:
                left = values.shape[0] - offset
                if filled == 0:  # whole rows of blocks straight from the tile
                    whole = min(left, rows - done)
                    if whole < rows - done:
                        whole = whole // block_rows * block_rows
                    if whole:
                        quantize(values[offset : offset + whole])
                        offset += whole
                        done = (done + whole) % rows
                        continue
                if joined.shape[0] != block_rows:
                    joined = torch.empty((block_rows, cols), dtype=self.dtype)
                # The row of blocks ends at block_rows rows or at its matrix's end.
                wanted = min(block_rows, rows - done)
                take = min(wanted - filled, left)
                joined[filled : filled + take].copy_(values[offset : offset + take])
                filled += take
                offset += take
                if filled == wanted:
                    quantize(joined[:filled])
                    done = (done + filled) % rows
                    filled = 0
        assert filled == 0 and done == 0, f"{name}: tiles ended inside a matrix"
        on_bytes(writer.tensor(self.scale_name).write(inv_scales))

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
            TensorSpec(name, F8_E4M3, self.shape),
            TensorSpec(self.scale_name, dtype_of(self.dtype), (self.shape[0], 1)),
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
        # One tensor of scales, allocated first (see Fp8BlockNative.write).
        scales = torch.empty((self.shape[0], 1), dtype=self.dtype)
        done = 0
        for tile in tiles:
            codes, tile_scales = quantize_fp8_channels(tile.to("cpu", self.dtype))
            on_bytes(slot.write(codes))
            scales[done : done + tile_scales.shape[0]].copy_(tile_scales)
            done += tile_scales.shape[0]
        on_bytes(writer.tensor(self.scale_name).write(scales))
