"""The fast decoding kernels against the format libraries' own decoders, on every code.

``dequantize_fp8_blocks`` looks codes up two at a time (their bytes as one uint16) where it
can, one at a time where it cannot (an odd width, an odd start); both are checked against
transformers' ``Fp8Dequantize`` on every pair of adjacent codes (NaN codes, subnormals, the
largest values, E5M2's infinities included) under a different scale per block, and on
partial edge blocks against the float64 decoding of ``native_formats.py``.

``four_bit_codes`` (GPTQ's words, once transposed as words) unpacks 4-bit codes as float32
by one table lookup a byte; the oracle is compressed-tensors' ``unpack_from_int32`` (the
first code of a word in its lowest bits, as GPTQ packs too), on words holding every byte
at every position, negative words too.

``dequantize_mxfp4_bytes`` decodes bytes of an MXFP4 matrix's stored rows, two values a
lookup in a table of scaled pairs, read as the transposed layout transformers gives gpt-oss'
experts; the oracle is transformers'
``convert_moe_packed_tensors`` (itself checked against a float64 decoding of the format in
``test_native_fp8_mxfp4.py``). The values cover every byte (all 16 E2M1 codes in both
nibbles, -0 included) under every finite E8M0 exponent: 0 (subnormal products in float32,
zeros and subnormals in bf16/fp16), 127 (the codes themselves) and 254 (products beyond
float32's range: infinities), in byte ranges that start and end inside
and across 32-value blocks, from strided views of the stored bytes.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from native_formats import dequantize_fp8_blocks_float64
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lora_merge.compute.dequantize import DequantizeWorkspace
from lora_merge.compute.fp8 import dequantize_fp8_blocks
from lora_merge.compute.integer_dequantize import four_bit_codes
from lora_merge.compute.mxfp4 import dequantize_mxfp4_bytes

FP8_BLOCK = (128, 128)

# One stored row per finite exponent, each holding every byte once (16 blocks of 32
# values), rotated by the row so that a byte sits at a different position in each row.
ROWS, GROUPS = 255, 16


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor: -0 differs from +0, and infinities compare as bits."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def every_byte_under_every_exponent() -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(GROUPS * 16)
    blocks = (positions[None, :] + torch.arange(ROWS)[:, None]) % 256
    blocks = blocks.to(torch.uint8).view(ROWS, GROUPS, 16)
    exponents = torch.arange(ROWS, dtype=torch.uint8).view(ROWS, 1).repeat(1, GROUPS)
    return blocks, exponents


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_bytes_are_transformers_dequantization_bit_for_bit(dtype):
    blocks, exponents = every_byte_under_every_exponent()
    # transformers: (experts, rows, groups, 16) -> (experts, groups * 32, rows), transposed.
    expected = convert_moe_packed_tensors(blocks[None], exponents[None], dtype=dtype)[0]
    assert bool(torch.isinf(expected).any()) and bool((expected == 0).any())
    workspace = DequantizeWorkspace()
    packed = blocks.view(ROWS, GROUPS * 16)
    # Byte ranges inside and across 16-byte (32-value) blocks; the last two from stored
    # rows 100 on (a strided view of the stored bytes, as an expert's rows are).
    ranges = [
        (0, GROUPS * 16, 0),
        (0, 1, 0),
        (3, 19, 0),
        (15, 17, 0),
        (16, 48, 100),
        (255, 256, 100),
    ]
    for first, last, row in ranges:
        values = torch.full((ROWS - row, 2 * (last - first)), float("nan"))
        dequantize_mxfp4_bytes(packed[row:], exponents[row:], first, last, values, workspace)
        # The float32 products, rounded once to the model's dtype (as read_rows and
        # read_subrows do), read as the transpose.
        got = values.t().to(dtype)
        want = expected[2 * first : 2 * last, row:]
        assert torch.equal(bits(got), bits(want)), (dtype, first, last, row)


def test_mxfp4_float32_values_are_the_bfloat16_values_widened():
    """What lets a bfloat16 model's MXFP4 experts be decoded straight to float32 for the merge
    (``Mxfp4Weight.read_subrows`` with ``compute_dtype`` float32): transformers' bfloat16
    dequantization, widened, is its float32 dequantization, bit for bit, on every byte under
    every finite exponent (infinities and the smallest products included); float16's is not
    (its range is narrower), so a float16 model's values are rounded to float16."""
    blocks, exponents = every_byte_under_every_exponent()
    as_bfloat16 = convert_moe_packed_tensors(blocks[None], exponents[None], dtype=torch.bfloat16)
    as_float32 = convert_moe_packed_tensors(blocks[None], exponents[None], dtype=torch.float32)
    assert torch.equal(bits(as_bfloat16.float()), bits(as_float32))
    as_float16 = convert_moe_packed_tensors(blocks[None], exponents[None], dtype=torch.float16)
    assert not torch.equal(bits(as_float16.float()), bits(as_float32))


def every_code_pair(codes_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(256, 512) codes where row ``a`` holds the pairs ``(a, b)`` for every ``b`` at columns
    ``2b, 2b + 1``, and a scale per 128 x 128 block (one of them a power of two, one tiny)."""
    first = torch.arange(256).view(256, 1).expand(256, 256)
    second = torch.arange(256).view(1, 256).expand(256, 256)
    pairs = torch.stack((first, second), dim=-1).reshape(256, 512).to(torch.uint8)
    scales = torch.tensor([[1.0, 0.3, 2.0**-20, 7.5], [1e-4, 3.0, 0.5, 1.7]])
    return pairs.view(codes_dtype), scales


@pytest.mark.parametrize("codes_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_pairs_and_single_codes_are_transformers_dequantization_bit_for_bit(codes_dtype, dtype):
    codes, scales = every_code_pair(codes_dtype)
    expected = Fp8Dequantize(None)._dequantize_one(codes, scales, dtype)
    assert bool(torch.isnan(expected).any())
    workspace = DequantizeWorkspace()
    # The same codes one byte into their storage: no uint16 view, one code at a time.
    shifted = torch.empty(codes.numel() + 1, dtype=codes_dtype)[1:].view(codes.shape)
    shifted.copy_(codes)
    for stored in (codes, shifted):
        for first in (0, 100):  # a run of rows from inside a block row
            out = torch.empty(256 - first, 512, dtype=dtype)
            got = dequantize_fp8_blocks(
                stored[first:], scales, FP8_BLOCK, first, dtype, out, workspace
            )
            assert torch.equal(bits(got), bits(expected[first:])), (stored is codes, first)


@pytest.mark.parametrize("columns", [200, 201])
def test_fp8_partial_blocks_are_the_float64_decoding(columns):
    """Rows and columns ending inside a block (an odd width: one code at a time). NaN codes
    give NaN (their payload through float64 is not the oracle's to say)."""
    codes, _ = every_code_pair(torch.float8_e4m3fn)
    codes = codes[:130, :columns]
    scales = torch.rand(2, 2, generator=torch.Generator().manual_seed(3)) + 0.25
    exact = dequantize_fp8_blocks_float64(codes, scales, FP8_BLOCK).float()
    got = dequantize_fp8_blocks(codes, scales, FP8_BLOCK, 0, torch.float32)
    nan = torch.isnan(exact)
    assert bool(nan.any()) and torch.equal(torch.isnan(got), nan)
    assert torch.equal(bits(got[~nan]), bits(exact[~nan]))


def test_four_bit_codes_are_compressed_tensors_unpacking():
    rows, words = 256, 5
    as_bytes = (torch.arange(words * 4)[None, :] + torch.arange(rows)[:, None] * 3) % 256
    packed = as_bytes.to(torch.uint8).contiguous().view(torch.int32)  # (rows, words)
    assert bool((packed < 0).any())
    # compressed-tensors returns the codes less 2 ** (bits - 1), as int8.
    expected = unpack_from_int32(packed, 4, torch.Size((rows, words * 8))).to(torch.int32) + 8
    indices = torch.empty(rows * words * 8, dtype=torch.int32)
    got = four_bit_codes(packed, torch.empty(rows, words * 8), indices)
    assert torch.equal(got, expected.float())
