"""Integer weight formats (compressed-tensors, GPTQ, AWQ) decoded in plain torch. No I/O.

Each of these formats stores a weight as unsigned integer codes of ``bits``
bits packed into int32 words, plus one scale and one zero point per group of
input features (a whole row for "channel" quantization). Every decoder computes

    weight = (code - zero) * scale

with the two subtractions done on integers and one multiplication, rounded to
the scales' dtype, which is what each format's reference decoder returns:

- compressed-tensors (``pack-quantized``, ``int-quantized``):
  ``compressed_tensors.quantization.lifecycle.forward_helpers._dequantize``,
  ``(x_q.to(scale.dtype) - zero_point.to(scale.dtype)) * scale``. Its packed
  codes carry an offset of ``2 ** (bits - 1)`` (``pack_to_int32`` adds it), and
  so do its packed zero points, so ``x_q - zero_point`` is ``code - zero_code``;
  a symmetric weight has no zero point: ``code - 2 ** (bits - 1)``.
- GPTQ (AutoGPTQ ``qlinear_cuda_old.QuantLinear.forward``'s torch path, GPTQModel
  ``TorchQuantLinear.dequantize_weight``): ``scales[g_idx] * (weight - zeros[g_idx])``
  in float16. AutoGPTQ's checkpoints (``checkpoint_format`` ``gptq``, "v1") store
  each zero minus one and add the one back after masking; GPTQModel's ``gptq_v2``
  stores the zero itself.
- AWQ GEMM (AutoAWQ ``awq/utils/packing_utils.py::dequantize_gemm``):
  ``(iweight - izeros) * scales`` in float16, zeros stored as they are.

Why float32 gives the reference's bits: ``code - zero`` is an integer of at most
9 bits, and a bfloat16 or float16 scale has at most 11 significant bits, so the
float32 product is exact and its one rounding to the scales' dtype is the
correctly rounded product the reference computes in that dtype (its CPU and
CUDA kernels round each product once). With float32 scales the reference
multiplies in float32 itself: the same operation.

Bit order: an int32 word holds ``32 // bits`` codes, the first in the lowest
bits (GPTQ, compressed-tensors' ``pack_to_int32`` for ``bits`` dividing 32).
AWQ's GEMM packer interleaves the output columns of a word in the order
:data:`AWQ_PACK_ORDER`. Only ``bits`` that divide 32 (2, 4, 8) are read: for
those, compressed-tensors' dense packing (0.20) and its earlier per-word packing
are the same bits, and GPTQ and AWQ never split a code across words.
"""

from __future__ import annotations

import sys

import torch

# Code widths whose codes never straddle an int32 word.
PACKED_BITS = (2, 4, 8)
# AutoAWQ's GEMM packer: bits 4*i of a word hold output column 8*c + AWQ_PACK_ORDER[i]
# (awq/modules/linear/gemm.py WQLinear_GEMM.from_linear, awq/utils/packing_utils.py).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Its inverse: column 8*c + m sits at position AWQ_UNPACK_ORDER[m] of the unpacked word.
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def codes_per_word(bits: int) -> int:
    """How many ``bits``-bit codes one int32 word holds (``bits`` in :data:`PACKED_BITS`)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"{bits}-bit codes are not packed whole into int32 words")
    return 32 // bits


def _word_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The bytes of int32 words, least significant first whatever the host's byte order.

    ``(..., words)`` int32 becomes ``(..., words, 4)`` uint8. Only CPU tensors can
    live on a big-endian host, where each word's bytes come in reverse.
    """
    flat = packed.reshape(-1)
    if flat.stride(0) != 1:
        # A tensor with a dimension of 1 counts as contiguous whatever that dimension's
        # stride, and a view as bytes needs the last stride to be 1.
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
    as_bytes = flat.view(torch.uint8).view(*packed.shape, 4)
    if sys.byteorder == "big" and packed.device.type == "cpu":
        as_bytes = as_bytes.flip(-1)
    return as_bytes


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes from int32 words, along the last dimension, the first code lowest.

    Args:
        packed: int32, ``(..., words)``.
        bits: code width, one of :data:`PACKED_BITS`.

    Returns:
        uint8, ``(..., words * 32 // bits)``: code ``k`` of word ``w`` is bits
        ``bits * k`` to ``bits * (k + 1)`` of that word, at index ``w * 32 // bits + k``.
    """
    codes_per_word(bits)
    as_bytes = _word_bytes(packed)
    if bits == 8:
        return as_bytes.flatten(-2)
    # Splitting bytes needs no 32-bit shifts: each byte holds 8 // bits whole codes.
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (as_bytes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-3)


def unpack_codes_down_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes packed along the first dimension (GPTQ's ``qweight``, compressed-tensors'
    zero points): word ``(p, j)`` holds rows ``p * 32 // bits ..`` of column ``j``.

    Args:
        packed: int32, ``(words, columns)``.
        bits: code width, one of :data:`PACKED_BITS`.

    Returns:
        uint8, ``(words * 32 // bits, columns)``.
    """
    per_word = codes_per_word(bits)
    codes = unpack_codes(packed, bits)  # (words, columns * per_word)
    words, columns = packed.shape
    return codes.view(words, columns, per_word).transpose(1, 2).reshape(words * per_word, columns)


def unpack_awq_codes(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM's 4-bit codes (``qweight`` or ``qzeros``, packed along the output columns in
    :data:`AWQ_PACK_ORDER`) in column order.

    Args:
        packed: int32, ``(rows, columns // 8)``.

    Returns:
        uint8, ``(rows, columns)``.
    """
    codes = unpack_codes(packed, 4)
    order = torch.tensor(AWQ_UNPACK_ORDER, device=packed.device)
    return codes.unflatten(-1, (-1, 8)).index_select(-1, order).flatten(-2)


def four_bit_pair_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """256 int64 values: entry ``b`` holds the bits of the float32 pair ``(b & 15, b >> 4)``,
    the two 4-bit codes of byte ``b``, the lower first (the first code of a word is lowest)."""
    codes = torch.arange(16, dtype=torch.float32, device=device)
    pairs = torch.stack((codes.repeat(16), codes.repeat_interleave(16)), dim=1)
    return pairs.contiguous().view(torch.int64).reshape(-1)


def four_bit_codes(packed: torch.Tensor, out: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_codes` of 4-bit codes, as float32 values: one gather per byte.

    The same codes in the same order, written as float32 (exact: integers below 16) by one
    lookup of each byte in :func:`four_bit_pair_table`, where unpacking them (a shift and a
    mask of every byte, then a transpose and a conversion to float32) takes four passes
    (measured in a GPTQ merge at Llama-3-8B's widths: about half the time).

    Args:
        packed: int32 ``(rows, words)``.
        out: float32 ``(rows, words * 8)``, contiguous.
        indices: int32 scratch of at least ``rows * words * 4`` elements.

    Returns:
        ``out``.
    """
    as_bytes = _word_bytes(packed).reshape(-1)
    index = indices[: as_bytes.numel()]
    index.copy_(as_bytes)
    table = four_bit_pair_table(packed.device)
    torch.index_select(table, 0, index, out=out.view(-1).view(torch.int64))
    return out


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | int,
    group_size: int,
    dtype: torch.dtype,
    column_groups: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(code - zero) * scale`` per group of columns, in float32, rounded once to ``dtype``.

    Rows are output features (a torch ``Linear`` weight's rows), columns input
    features; a group is ``group_size`` consecutive columns, or, with
    ``column_groups`` (GPTQ's ``g_idx`` under ``desc_act``), the columns that name it.

    Args:
        codes: ``(rows, columns)`` unsigned codes (any integer dtype), or as float32
            values, then overwritten when contiguous.
        scales: ``(rows, groups)``: the scale of each row's groups, from the group of
            column 0 (a caller passing a slice of columns passes the groups from there).
        zeros: ``(rows, groups)`` integer zero points beside ``scales``, or one integer
            for every element (a symmetric format's midpoint).
        group_size: columns per group; with ``column_groups`` unused.
        dtype: the dtype the reference decoder returns (the scales' dtype).
        column_groups: ``(columns,)`` int: the group of each column, indexing
            ``scales``' second dimension; None: ``column // group_size``, and ``columns``
            a multiple of ``group_size`` unless ``scales`` has one group.
        out: ``(rows, columns)`` of ``dtype`` to write into; None: fresh memory.

    Returns:
        ``out`` (or a new tensor).
    """
    rows, columns = codes.shape
    if codes.dtype == torch.float32 and codes.is_contiguous():
        values = codes  # codes already unpacked as float32 (four_bit_codes): worked on in place
    else:
        # Row-major whatever the codes' layout (GPTQ/AWQ codes come transposed): the views
        # below need it.
        values = torch.empty((rows, columns), dtype=torch.float32, device=codes.device)
        values.copy_(codes)
    if column_groups is not None:
        scales = scales.index_select(1, column_groups)
        if isinstance(zeros, torch.Tensor):
            zeros = zeros.index_select(1, column_groups)
        group_size = 1
    grouped = values.view(rows, -1, min(group_size, columns))
    # code - zero: small integers, exact in float32.
    if isinstance(zeros, torch.Tensor):
        grouped.sub_(zeros.to(torch.float32).unsqueeze(-1))
    else:
        grouped.sub_(float(zeros))
    grouped.mul_(scales.to(torch.float32).unsqueeze(-1))
    if out is None:
        return values.to(dtype)
    return out.copy_(values)
