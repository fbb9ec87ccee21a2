"""bitsandbytes dequantization in plain torch. Tensors in, tensors out; no I/O.

These functions reproduce, bit for bit, what ``bitsandbytes.functional``
computes (checked against it in ``tests/test_quantized_bases.py``), for
machines and devices where bitsandbytes is missing or cannot run:

- 4-bit (NF4 / FP4, QLoRA): element ``i`` of the flattened weight is
  ``code[q_i] * absmax[i // blocksize]`` computed in float32, then rounded to
  the quant state's dtype (bitsandbytes' ``_dequantize_4bit_compute`` and its
  CPU/CUDA kernels). Two 4-bit codes share a byte, the first in the high nibble.
- Double quantization ("nested" absmax): the absmax values are themselves
  8-bit codes, ``nested_code[q_j] * nested_absmax[j // nested_blocksize]`` in
  float32, plus a float32 offset (``dequantize_blockwise`` then ``absmax += offset``).
- LLM.int8 (8-bit): ``int8 * SCB[row] * 7.874015718698502e-3`` in float32
  (``int8_vectorwise_dequant``; the constant is bitsandbytes' float for 1/127).

Every function works on a range of elements that starts on a block boundary, so
a large tensor can be dequantized a chunk at a time and give the same bits as
dequantizing it whole: each element depends only on its own code and its
block's scale.
"""

from __future__ import annotations

import torch

# The 16 NF4 values (quantiles of N(0, 1), QLoRA paper, appendix E), as
# bitsandbytes' get_4bit_type("nf4") lists them.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, before
# bitsandbytes divides the table by its largest magnitude (12).
_FP4_UNNORMALIZED = (
    0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    -0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)
FOUR_BIT_QUANT_TYPES = ("nf4", "fp4")
# Block sizes bitsandbytes' quantize_4bit / dequantize_4bit accept.
FOUR_BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes' int8_vectorwise_dequant multiplies by this float, not divides by 127.
INT8_DEQUANT_FACTOR = 7.874015718698502e-3


def four_bit_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 codebook of ``nf4`` or ``fp4``, as bitsandbytes builds it."""
    if quant_type == "nf4":
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    elif quant_type == "fp4":
        code = torch.tensor(_FP4_UNNORMALIZED, dtype=torch.float32, device=device)
    else:
        raise ValueError(f"unknown 4-bit quant type {quant_type!r}")
    # bitsandbytes: data.div_(data.abs().max()), in float32.
    return code.div_(code.abs().max())


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """(256, 2): the two code values each byte holds, high nibble first.

    Looking a byte up in this table unpacks and decodes both its weights in one
    gather (about 2x faster on CPU, measured, than unpacking the nibbles, then decoding them).
    """
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)


def scale_by_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scales[i // blocksize]`` in float32, for 1-D ``values`` starting a block."""
    count = values.numel()
    full = count - count % blocksize
    out = torch.empty(count, dtype=torch.float32, device=values.device)
    blocks = full // blocksize
    if blocks:
        out[:full] = (values[:full].view(blocks, blocksize) * scales[:blocks].view(-1, 1)).view(-1)
    if full < count:
        out[full:] = values[full:] * scales[blocks]
    return out


def dequantize_nested_absmax(
    quantized_absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int,
    offset: float,
) -> torch.Tensor:
    """Float32 absmax values from their 8-bit codes (bitsandbytes double quantization).

    Args:
        quantized_absmax: uint8 codes of absmax values ``j0 ..``, ``j0`` a multiple
            of ``nested_blocksize``.
        nested_absmax: float32 scale of each nested block, from block ``j0 // nested_blocksize``.
        nested_code: the 256-entry float32 codebook (``nested_quant_map``).
        nested_blocksize: absmax values per nested block (256 in bitsandbytes).
        offset: the mean subtracted before quantizing (``nested_offset``).
    """
    values = nested_code[quantized_absmax.reshape(-1).long()]
    absmax = scale_by_blocks(values, nested_absmax.float(), nested_blocksize)
    # bitsandbytes adds the offset as a float32 0-d tensor, in place.
    return absmax.add_(torch.tensor(offset, dtype=torch.float32, device=absmax.device))


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    count: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``count`` weights from packed 4-bit codes, 1-D, in ``dtype`` (bitsandbytes' dequantize_4bit).

    Args:
        packed: uint8 bytes holding the codes of elements ``e0 .. e0 + count``,
            ``e0`` a multiple of ``blocksize``.
        absmax: float32 scale of each block, from block ``e0 // blocksize``.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: elements per block.
        count: elements to produce.
        dtype: the quant state's dtype, which bitsandbytes rounds to.
    """
    pairs = code_pairs(four_bit_code(quant_type, packed.device))
    values = pairs[packed.reshape(-1).long()].reshape(-1)[:count]
    return scale_by_blocks(values, absmax.float(), blocksize).to(dtype)


def dequantize_int8_rows(weight_rows: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """LLM.int8 rows to float32: ``int8 * SCB * (1/127)``, as ``int8_vectorwise_dequant``."""
    return weight_rows * row_scales.view(-1, 1) * INT8_DEQUANT_FACTOR
