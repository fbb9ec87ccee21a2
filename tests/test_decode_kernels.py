"""The fast decoding kernels against the format libraries' own decoders, on every code.

``dequantize_mxfp4_transposed`` decodes a band of an MXFP4 matrix straight into the
transposed layout transformers gives gpt-oss' experts; the oracle is transformers'
``convert_moe_packed_tensors`` (itself checked against a float64 decoding of the format in
``test_native_fp8_mxfp4.py``). The values cover every byte (all 16 E2M1 codes in both
nibbles, -0 included) under every finite E8M0 exponent: 0 (subnormal products in float32,
zeros and subnormals in bf16/fp16), 127 (the codes themselves) and 254 (products beyond
float32's range: infinities), in bands that start and end on odd and even elements, inside
and across 32-value blocks.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lora_merge.compute.dequantize import DequantizeWorkspace
from lora_merge.compute.mxfp4 import dequantize_mxfp4_transposed

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
def test_mxfp4_transposed_bands_are_transformers_dequantization_bit_for_bit(dtype):
    blocks, exponents = every_byte_under_every_exponent()
    # transformers: (experts, rows, groups, 16) -> (experts, groups * 32, rows), transposed.
    expected = convert_moe_packed_tensors(blocks[None], exponents[None], dtype=dtype)[0]
    assert bool(torch.isinf(expected).any()) and bool((expected == 0).any())
    columns = GROUPS * 32
    workspace = DequantizeWorkspace()
    packed = blocks.view(ROWS, GROUPS * 16)
    bands = [(0, columns), (0, 1), (1, 2), (5, 38), (31, 33), (33, 96), (64, 96), (510, 511)]
    for start, stop in bands:
        out = torch.full((stop - start, ROWS), float("nan"), dtype=dtype)
        dequantize_mxfp4_transposed(packed, exponents, start, stop, out, workspace)
        assert torch.equal(bits(out), bits(expected[start:stop])), (dtype, start, stop)
