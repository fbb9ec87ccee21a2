"""MXFP4 (OCP Microscaling, E2M1 values with an E8M0 scale per 32) in plain torch.

Tensors in, tensors out; no I/O. gpt-oss stores its experts this way
(``*_blocks``: two E2M1 codes per byte, element ``2k`` in the *low* nibble;
``*_scales``: one biased exponent per 32 values). Decoding is transformers'
``_convert_moe_packed_tensors`` (``integrations/mxfp4.py``): the code's value
times ``2 ** (scale - 127)``. Every such product is exact in float32 (a 2-bit
significand scaled by a power of two inside float32's range, subnormals
included, or infinity beyond it), and transformers' ``ldexp`` of bf16 values by
a float32 power of two rounds that same product once to the model's dtype, so
a float32 product rounded once gives its bits.

Exponent 255 is E8M0's NaN: :func:`has_nan_scale` finds it so that a reader
can refuse the checkpoint.
"""

from __future__ import annotations

import torch

MXFP4_BLOCK = 32  # values per E8M0 scale
MXFP4_BYTES_PER_BLOCK = MXFP4_BLOCK // 2
E8M0_BIAS = 127
E8M0_NAN = 255
# E2M1 values by code (transformers' FP4_VALUES; the OCP MX spec's table).
E2M1_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)


def e2m1_pair_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """256 int64 values, each the bits of the two float32 values a byte holds, low nibble first.

    One ``index_select`` over it unpacks and decodes a byte (as the NF4 path does).
    """
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    pairs = torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=1)
    return pairs.contiguous().view(torch.int64).reshape(-1)


def e8m0_scale_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 scales ``2 ** (e - 127)`` (e = 255, NaN, gives infinity here: refuse it
    before decoding)."""
    exponents = torch.arange(256, dtype=torch.float32, device=device) - E8M0_BIAS
    return torch.exp2(exponents)


def has_nan_scale(scales: torch.Tensor) -> bool:
    """Whether any E8M0 exponent is 255 (NaN)."""
    return bool((scales == E8M0_NAN).any())


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    pair_table: torch.Tensor,
    scale_table: torch.Tensor,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of MXFP4 to float32: ``e2m1(code) * 2 ** (scale - 127)``.

    Args:
        blocks: uint8 ``(rows, groups, 16)``.
        scales: uint8 ``(rows, groups)``.
        pair_table: :func:`e2m1_pair_table` on the same device.
        scale_table: :func:`e8m0_scale_table` on the same device.
        values: float32 ``rows * groups * 32`` elements to write into; None: fresh memory.

    Returns:
        float32 ``(rows, groups * 32)``.
    """
    rows, groups = scales.shape
    count = rows * groups * MXFP4_BLOCK
    if values is None:
        values = torch.empty(count, dtype=torch.float32, device=blocks.device)
    indices = blocks.reshape(-1).to(torch.int32)
    torch.index_select(pair_table, 0, indices, out=values.view(torch.int64))
    block_scales = torch.index_select(scale_table, 0, scales.reshape(-1).to(torch.int32))
    grouped = values.view(rows * groups, MXFP4_BLOCK)
    grouped.mul_(block_scales.view(-1, 1))
    return values.view(rows, groups * MXFP4_BLOCK)
