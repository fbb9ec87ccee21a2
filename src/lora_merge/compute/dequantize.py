"""bitsandbytes dequantization in plain torch. Tensors in, tensors out; no I/O.

These functions reproduce, bit for bit, what ``bitsandbytes.functional``
computes (checked against it in ``tests/test_quantized_bases.py`` and
``tests/test_dequantize_properties.py``, and against the format decoded in
float64 in ``tests/support/quantized_oracle.py``). On the CPU they are what lora-merge
uses even where bitsandbytes is installed: its kernel is faster per element
(about 1.7x, measured), but importing it costs about 2 s and 120 MB of resident
memory, more than the whole dequantization of a 1.1B model on this path
(``benchmarks/bench_dequantize.py``). The operations:

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

from collections.abc import Callable

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
# bitsandbytes divides the table by its largest magnitude (12). Code 0b1000 is
# +0.0: bitsandbytes writes it as the Python int ``-0``, so the stored quant_map,
# its CPU kernel and its pure-torch path all give +0.0 (its CUDA kernel gives
# -0.0, sign times zero; lora-merge follows the format on every device).
_FP4_UNNORMALIZED = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
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


# Elements dequantized at once: a multiple of every 4-bit blocksize, so each chunk starts a
# block. Its workspace is 1.5 MiB (int32 indices for half of them, float32 values for all).
DEQUANTIZE_CHUNK_ELEMENTS = 2**18
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


def code_pair_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`code_pairs` of ``quant_type`` as 256 int64 values, each the bits of one pair.

    ``index_select`` over this 1-D table moves a whole pair (8 bytes) per byte of
    codes; the same gather over the (256, 2) float32 table is 3.5x slower on CPU,
    and advanced indexing (``pairs[codes.long()]``) 20x slower (measured, 2 cores).
    """
    pairs = code_pairs(four_bit_code(quant_type, device))
    return pairs.contiguous().view(torch.int64).reshape(-1)


class DequantizeWorkspace:
    """One thread's reusable buffers for the functions below, grown on demand, never shrunk.

    Dequantizing a tile then allocates nothing: the byte-to-index conversion, the
    float32 values and the scales land in these buffers, and the code tables are
    built once. Not thread-safe: give each thread its own (the stream's threads
    dequantize at once).

    Args:
        device: where the buffers live (the device dequantization runs on).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._pair_tables: dict[str, torch.Tensor] = {}
        self._tables: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``count`` elements of buffer ``name`` as ``dtype`` (1-D, contents undefined).

        The same name gives the same memory each call: a caller owns a name until
        it calls again with it.
        """
        nbytes = count * dtype.itemsize
        held = self._buffers.get(name)
        if held is None or held.numel() < nbytes:
            # Round up to 8 bytes so that any dtype's view starts aligned.
            held = torch.empty(-(-nbytes // 8) * 8, dtype=torch.uint8, device=self.device)
            self._buffers[name] = held
        return held[:nbytes].view(dtype)

    def pair_table(self, quant_type: str) -> torch.Tensor:
        """:func:`code_pair_table` of ``quant_type`` on this workspace's device, built once."""
        table = self._pair_tables.get(quant_type)
        if table is None:
            table = code_pair_table(quant_type, self.device)
            self._pair_tables[quant_type] = table
        return table

    def table(self, name: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The small lookup table ``name`` on this workspace's device, built once by ``build``
        (FP8 and MXFP4 value tables; 1-2 KiB each)."""
        table = self._tables.get(name)
        if table is None:
            table = build()
            self._tables[name] = table
        return table

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (the code tables are 2 KiB each)."""
        return sum(held.numel() for held in self._buffers.values())


def scale_by_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] *= scales[i // blocksize]`` in float32, in place, for 1-D ``values`` starting
    a block; returns ``values``."""
    count = values.numel()
    full = count - count % blocksize
    blocks = full // blocksize
    if blocks:
        values[:full].view(blocks, blocksize).mul_(scales[:blocks].view(-1, 1))
    if full < count:
        values[full:].mul_(scales[blocks])
    return values


def _byte_indices(codes: torch.Tensor, workspace: DequantizeWorkspace, name: str) -> torch.Tensor:
    """uint8 ``codes`` widened to int32 in ``workspace`` (index_select's cheapest index type)."""
    indices = workspace.buffer(name, codes.numel(), torch.int32)
    return indices.copy_(codes.reshape(-1))


def dequantize_nested_absmax(
    quantized_absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int,
    offset: float,
    workspace: DequantizeWorkspace | None = None,
) -> torch.Tensor:
    """Float32 absmax values from their 8-bit codes (bitsandbytes double quantization).

    Args:
        quantized_absmax: uint8 codes of absmax values ``j0 ..``, ``j0`` a multiple
            of ``nested_blocksize``.
        nested_absmax: float32 scale of each nested block, from block ``j0 // nested_blocksize``.
        nested_code: the 256-entry float32 codebook (``nested_quant_map``).
        nested_blocksize: absmax values per nested block (256 in bitsandbytes).
        offset: the mean subtracted before quantizing (``nested_offset``).
        workspace: buffers to reuse; the result then lives in its ``absmax`` buffer
            (valid until the next call with it). None: fresh memory.

    Returns:
        1-D float32, one value per code.
    """
    if workspace is None:
        workspace = DequantizeWorkspace(quantized_absmax.device)
    indices = _byte_indices(quantized_absmax, workspace, "absmax_indices")
    absmax = workspace.buffer("absmax", indices.numel(), torch.float32)
    torch.index_select(nested_code.float(), 0, indices, out=absmax)
    scale_by_blocks(absmax, nested_absmax.float(), nested_blocksize)
    # bitsandbytes adds the offset as a float32 0-d tensor, in place (float32 addition).
    return absmax.add_(torch.tensor(offset, dtype=torch.float32, device=absmax.device))


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    count: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    workspace: DequantizeWorkspace | None = None,
) -> torch.Tensor:
    """``count`` weights from packed 4-bit codes, 1-D, in ``dtype`` (bitsandbytes' dequantize_4bit).

    One gather of a byte's two float32 code values (:func:`code_pair_table`), one
    float32 multiplication by the block's scale, one rounding to ``dtype``: the
    operations and the order of bitsandbytes' kernels, so the same bits.

    Args:
        packed: uint8 bytes holding the codes of elements ``e0 .. e0 + count``,
            ``e0`` a multiple of ``blocksize``.
        absmax: float32 scale of each block, from block ``e0 // blocksize``.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: elements per block.
        count: elements to produce.
        dtype: the quant state's dtype, which bitsandbytes rounds to.
        out: where to write the result (``count`` elements of ``dtype``, on the
            device of ``packed``); None: fresh memory.
        workspace: the calling thread's buffers for the intermediate values; None: fresh ones.

    Returns:
        ``out`` (or a new tensor), 1-D. The workspace holds at most
        :data:`DEQUANTIZE_CHUNK_ELEMENTS` values, whatever ``count``.
    """
    if workspace is None:
        workspace = DequantizeWorkspace(packed.device)
    if out is None:
        out = torch.empty(count, dtype=dtype, device=packed.device)
    table = workspace.pair_table(quant_type)
    scales = absmax.float()
    packed = packed.reshape(-1)
    # A chunk at a time, so that the workspace stays bounded whatever the run's length (a
    # GPU tile is budget-sized); a CPU tile is one chunk.
    for first in range(0, count, DEQUANTIZE_CHUNK_ELEMENTS):
        last = min(count, first + DEQUANTIZE_CHUNK_ELEMENTS)
        indices = _byte_indices(packed[first // 2 : (last + 1) // 2], workspace, "indices")
        pairs = workspace.buffer("values", 2 * indices.numel(), torch.float32)
        torch.index_select(table, 0, indices, out=pairs.view(torch.int64))
        block_scales = scales[first // blocksize : -(-last // blocksize)]
        out[first:last].copy_(scale_by_blocks(pairs[: last - first], block_scales, blocksize))
    return out


def dequantize_int8_rows(
    weight_rows: torch.Tensor, row_scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """LLM.int8 rows to float32: ``int8 * SCB * (1/127)``, as ``int8_vectorwise_dequant``.

    Args:
        weight_rows: int8 rows.
        row_scales: float32 scale of each row.
        out: float32 tensor of ``weight_rows``' shape to write into; None: fresh memory.
    """
    product = torch.mul(weight_rows, row_scales.view(-1, 1), out=out)
    return product.mul_(INT8_DEQUANT_FACTOR)
