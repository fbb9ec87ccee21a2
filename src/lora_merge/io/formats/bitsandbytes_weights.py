"""One bitsandbytes weight: where its pieces are, and its rows dequantized.

The pieces are found and checked by :mod:`lora_merge.io.formats.bitsandbytes`;
this module decodes rows of them (:meth:`FourBitWeight.read_rows`,
:meth:`Int8Weight.read_rows`) through a
:class:`~lora_merge.io.formats.protocol.StoredRows`, with the kernels of
:mod:`lora_merge.compute.dequantize` (or bitsandbytes' own, when the reader was
asked for them).

A row range rarely starts on a quantization block, so the run of elements read
is widened to whole blocks, dequantized, and trimmed: every element depends
only on its own code and its block's scale, so the result has the bits a
whole-tensor dequantization gives. A thread reads a weight's tiles in order, so
the block scales are read (and, when nested, dequantized) a window of
:data:`ABSMAX_WINDOW_BLOCKS` at a time, not tile by tile: one read instead of
three, and no per-tile overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lora_merge.compute import bitsandbytes_backend
from lora_merge.compute.dequantize import (
    dequantize_4bit,
    dequantize_int8_rows,
    dequantize_nested_absmax,
)
from lora_merge.io.formats.protocol import StoredRows
from lora_merge.io.safetensors_format import TensorEntry

# Block scales a thread reads (and dequantizes) at once: 256 KiB of float32, the scales
# of 4M weights at blocksize 64, so one read serves ~30 CPU tiles.
ABSMAX_WINDOW_BLOCKS = 2**16
# The StoredRows.memo key of a thread's window of block scales.
_WINDOW_MEMO = "bitsandbytes.absmax_window"


class _DecodedWhole:
    """What both bitsandbytes weights answer alike under the QuantizedWeight protocol."""

    @property
    def reads_in_chunks(self) -> bool:
        """False: a read's workspace grows with its rows (see the protocol)."""
        return False

    def check_kept(self, stored: StoredRows) -> None:
        """Nothing to refuse: bitsandbytes' decoding checks no absmax either (a NaN there
        reaches the merged values, which the stream refuses); a kept weight is copied as
        bitsandbytes wrote it."""
        return None


@dataclass(frozen=True)
class NestedAbsmax:
    """Double quantization of a 4-bit weight's absmax (``bnb_4bit_use_double_quant``)."""

    nested_absmax: TensorEntry  # float32, one per nested block
    nested_quant_map: TensorEntry  # float32 (256,)
    blocksize: int
    offset: float


@dataclass(frozen=True)
class FourBitWeight(_DecodedWhole):
    """One NF4/FP4 weight: where its pieces are and what it stands for.

    Attributes:
        name: the logical tensor name (``X.weight``).
        shape / dtype: the logical shape and the dtype bitsandbytes dequantizes to.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: weights per absmax value.
        packed: the codes, two per byte (any storage dtype; read as bytes).
        absmax: one scale per block: float32, or uint8 codes when ``nested``.
        quant_map: the stored 16-entry codebook.
        nested: the double-quantization pieces, or None.
        quant_state: the JSON tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    packed: TensorEntry
    absmax: TensorEntry
    quant_map: TensorEntry
    nested: NestedAbsmax | None
    quant_state: TensorEntry

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_names(self) -> list[str]:
        names = [self.packed.name, self.absmax.name, self.quant_map.name, self.quant_state.name]
        if self.nested is not None:
            names += [self.nested.nested_absmax.name, self.nested.nested_quant_map.name]
        return names

    @property
    def anchor(self) -> str:
        return self.packed.name

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` dequantized (bitsandbytes' ``dequantize_4bit`` of the whole
        weight, those rows)."""
        row_elements = math.prod(self.shape[1:])
        first, last = start * row_elements, stop * row_elements
        # Widen to whole blocks: blocks start on even elements, so on whole bytes.
        block_first = first - first % self.blocksize
        block_last = min(self.numel, -(-last // self.blocksize) * self.blocksize)
        count = block_last - block_first
        packed = stored.byte_range(self.packed, block_first // 2, (block_last + 1) // 2, "packed")
        absmax = self._absmax(
            stored, block_first // self.blocksize, -(-block_last // self.blocksize)
        )
        values = None
        if stored.use_library_kernels:
            values = bitsandbytes_backend.dequantize_4bit_with_bitsandbytes(
                packed, absmax, self.quant_type, self.blocksize, count, self.dtype
            )
        if values is None:
            values = dequantize_4bit(
                packed,
                absmax,
                self.quant_type,
                self.blocksize,
                count,
                self.dtype,
                out=stored.output(count, self.dtype),
                workspace=stored.workspace,
            )
        trimmed = values[first - block_first : last - block_first]
        return trimmed.reshape(stop - start, *self.shape[1:])

    def _absmax(self, stored: StoredRows, first: int, last: int) -> torch.Tensor:
        """Float32 absmax of blocks ``first:last``, from the thread's window of scales."""
        window = stored.memo.get(_WINDOW_MEMO)
        if not (
            isinstance(window, tuple)
            and window[0] == self.name
            and window[1] <= first < last <= window[2]
        ):
            window = (self.name, *self._absmax_window(stored, first, last))
            stored.memo[_WINDOW_MEMO] = window
        scales: torch.Tensor = window[3]
        return scales[first - window[1] : last - window[1]]

    def _absmax_window(
        self, stored: StoredRows, first: int, last: int
    ) -> tuple[int, int, torch.Tensor]:
        """``(start, stop, scales)``: float32 absmax of blocks ``start:stop`` (covering
        ``first:last``), in the thread's workspace; nested ones dequantized."""
        nested = self.nested
        blocks = self.absmax.shape[0]
        if nested is None:
            stop = min(blocks, max(last, first + ABSMAX_WINDOW_BLOCKS))
            return first, stop, stored.rows(self.absmax, first, stop, "absmax")
        block = nested.blocksize
        start = first - first % block
        stop = min(blocks, -(-max(last, start + ABSMAX_WINDOW_BLOCKS) // block) * block)
        codes = stored.rows(self.absmax, start, stop, "absmax_codes")
        nested_scales = stored.rows(
            nested.nested_absmax, start // block, -(-stop // block), "nested_absmax"
        )
        code_rows = nested.nested_quant_map.shape[0]
        code = stored.rows(nested.nested_quant_map, 0, code_rows, "nested_code")
        absmax = None
        if stored.use_library_kernels:
            absmax = bitsandbytes_backend.dequantize_nested_absmax_with_bitsandbytes(
                codes, nested_scales, code, block, nested.offset
            )
        if absmax is None:
            absmax = dequantize_nested_absmax(
                codes, nested_scales, code, block, nested.offset, workspace=stored.workspace
            )
        return start, stop, absmax


@dataclass(frozen=True)
class Int8Weight(_DecodedWhole):
    """One LLM.int8 weight: int8 rows and a float32 scale per row (dequantizes to float32)."""

    name: str
    shape: tuple[int, ...]
    weight: TensorEntry
    row_scales: TensorEntry
    weight_format: TensorEntry | None
    dtype: torch.dtype = torch.float32

    @property
    def stored_names(self) -> list[str]:
        names = [self.weight.name, self.row_scales.name]
        return names + ([self.weight_format.name] if self.weight_format is not None else [])

    @property
    def anchor(self) -> str:
        return self.weight.name

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` dequantized (bitsandbytes' ``int8_vectorwise_dequant``)."""
        codes = stored.rows(self.weight, start, stop, "int8_codes")
        scales = stored.rows(self.row_scales, start, stop, "int8_scales")
        if stored.use_library_kernels:
            values = bitsandbytes_backend.dequantize_int8_with_bitsandbytes(codes, scales)
            if values is not None:
                return values
        out = stored.output(codes.numel(), torch.float32)
        return dequantize_int8_rows(codes, scales, None if out is None else out.view(codes.shape))
