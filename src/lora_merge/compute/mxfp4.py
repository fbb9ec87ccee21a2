"""MXFP4 (OCP Microscaling, E2M1 values with an E8M0 scale per 32) in plain torch.

Tensors in, tensors out; no I/O. gpt-oss stores its experts this way
(``*_blocks``: two E2M1 codes per byte, element ``2k`` in the *low* nibble;
``*_scales``: one biased exponent per 32 values). Decoding is transformers'
``_convert_moe_packed_tensors`` (``integrations/mxfp4.py``): the code's value
times ``2 ** (scale - 127)``. Every such product is exact in float32 (a 2-bit
significand scaled by a power of two inside float32's range, subnormals
included, or infinity beyond it), and transformers' ``ldexp`` of bf16 values by
a float32 power of two rounds that same product once to the model's dtype, so
a float32 product rounded once gives its bits. For a bfloat16 (or float32) model
that rounding changes nothing: every finite product has a 2-bit significand and an
exponent within bfloat16's range (its subnormals included), and one beyond float32's
range is infinity in both, so the float32 product *is* the model's value, widened.

Exponent 255 is E8M0's NaN: :func:`has_nan_scale` finds it so that a reader
can refuse the checkpoint.
"""

from __future__ import annotations

import torch

from lora_merge.compute.dequantize import DequantizeWorkspace

MXFP4_BLOCK = 32  # values per E8M0 scale
MXFP4_BYTES_PER_BLOCK = MXFP4_BLOCK // 2
E8M0_BIAS = 127
E8M0_NAN = 255
# Bytes of scaled_e2m1_pair_table: a float32 pair for each exponent and byte.
MXFP4_PAIR_TABLE_BYTES = 256 * 256 * 8
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


def e8m0_scale_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 scales ``2 ** (e - 127)`` (e = 255, NaN, gives infinity here: refuse it
    before decoding)."""
    exponents = torch.arange(256, dtype=torch.float32, device=device) - E8M0_BIAS
    return torch.exp2(exponents)


def scaled_e2m1_pair_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """65536 float32 pairs (512 KiB), viewed as float64: pair ``256 * e + b`` holds the E2M1
    values of byte ``b``'s low and high nibble (elements ``2j`` and ``2j + 1`` of a row),
    each times ``2 ** (e - 127)``.

    Each value is the exact product in float32 (see the module docstring; infinity where
    it is beyond float32's range, NaN for e = 255, which is refused before decoding), so
    one lookup decodes and scales both values of a byte.
    """
    nibbles = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    pairs = torch.stack((nibbles.repeat(16), nibbles.repeat_interleave(16)), dim=1)
    scaled = e8m0_scale_table(device)[:, None, None] * pairs[None]
    return scaled.reshape(-1, 2).contiguous().view(torch.float64).reshape(-1)


def has_nan_scale(scales: torch.Tensor) -> bool:
    """Whether any E8M0 exponent is 255 (NaN)."""
    return bool((scales == E8M0_NAN).any())


def dequantize_mxfp4_bytes(
    blocks: torch.Tensor,
    exponents: torch.Tensor,
    first: int,
    last: int,
    out: torch.Tensor,
    workspace: DequantizeWorkspace | None = None,
) -> torch.Tensor:
    """Bytes ``first:last`` of every stored row of an MXFP4 matrix, decoded in float32.

    Each value is ``e2m1(code) * 2 ** (e - 127)``, exact in float32 (see the module
    docstring), in the stored order: two values a byte, by one lookup of the byte and its
    row's exponent in :func:`scaled_e2m1_pair_table` (its index, ``256 * e + byte``, built
    by one int32 add a byte). A band of logical rows of gpt-oss' transposed experts is
    these values read as the transpose (``out.t()``): no byte or value is transposed, and
    the merge adds a band's LoRA product in this layout too (its ``B @ A`` for
    transposed weights is laid out ``(out, rows)``).

    Args:
        blocks: uint8 ``(n, k / 2)``, any strides: ``n`` stored rows of ``k`` values, element
            ``2j`` of a row in the low nibble of its byte ``j``, ``2j + 1`` in the high nibble.
        exponents: uint8 ``(n, k / 32)``, the rows' E8M0 exponents.
        first / last: the bytes of each row to decode (values ``2 * first:2 * last``).
        out: float32 ``(n, 2 * (last - first))``, contiguous.
        workspace: the calling thread's buffers (int32 indices, one a byte, and a column
            of offsets) and the table; None: fresh.

    Returns:
        ``out``.
    """
    if workspace is None:
        workspace = DequantizeWorkspace(blocks.device)
    table = workspace.table("mxfp4.pairs", lambda: scaled_e2m1_pair_table(blocks.device))
    rows, width = blocks.shape[0], last - first
    index = workspace.buffer("mxfp4_indices", rows * width, torch.int32).view(rows, width)
    offsets = workspace.buffer("mxfp4_offsets", rows, torch.int32).view(rows, 1)
    byte = first
    while byte < last:  # runs of bytes that share a column of exponents
        group = byte // MXFP4_BYTES_PER_BLOCK
        end = min(last, (group + 1) * MXFP4_BYTES_PER_BLOCK)
        offsets.copy_(exponents[:, group : group + 1])
        offsets.mul_(256)
        torch.add(blocks[:, byte:end], offsets, out=index[:, byte - first : end - first])
        byte = end
    torch.index_select(table, 0, index.view(-1), out=out.view(-1).view(torch.float64))
    return out


# Significand bits of the dtypes compressed-tensors rounds group maxima in (its
# round_to_power_2), with the integer dtype their bits are viewed as.
_SIGNIFICANDS = {
    torch.bfloat16: (7, 8, torch.int16),
    torch.float16: (10, 5, torch.int16),
    torch.float32: (23, 8, torch.int32),
}
E2M1_MANTISSA_BITS = 1
# floor(log2(6)): the E2M1 maximum's exponent, which compressed-tensors subtracts.
E2M1_MAX_EXPONENT = 2
E2M1_MAX = 6.0


def _round_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``round_to_power_2`` (``quantization/utils/mxfp_utils.py``): add half
    of E2M1's last significand step to the bits, then keep only sign and exponent."""
    mantissa, exponent, int_dtype = _SIGNIFICANDS[values.dtype]
    bits = values.view(int_dtype).to(torch.int32 if int_dtype == torch.int16 else torch.int64)
    if int_dtype == torch.int16:
        bits = bits & 0xFFFF  # the uint16 view compressed-tensors takes
    add = 1 << (mantissa - E2M1_MANTISSA_BITS - 1)
    mask = ((1 << (exponent + 1)) - 1) << mantissa
    rounded = (bits + add) & mask
    if int_dtype == torch.int16:
        return rounded.to(torch.uint16).view(values.dtype)
    return rounded.to(torch.int32).view(values.dtype)


def _cast_to_e2m1(values: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``cast_to_fp4`` (CPU): the nearest E2M1 value by its thresholds,
    ties as it breaks them, signed (a negative value rounded to 0 gives -0)."""
    sign = torch.sign(values)
    magnitude = values.abs()
    # Its masks, in order: [0, .25] -> 0, (.25, .75) -> .5, [.75, 1.25] -> 1, (1.25, 1.75)
    # -> 1.5, [1.75, 2.5] -> 2, (2.5, 3.5) -> 3, [3.5, 5] -> 4, above -> 6 (applied from
    # the top down here, each overriding the last).
    rounded = torch.full_like(magnitude, E2M1_MAX)
    rounded = torch.where(magnitude <= 5.0, 4.0, rounded)
    rounded = torch.where(magnitude < 3.5, 3.0, rounded)
    rounded = torch.where(magnitude <= 2.5, 2.0, rounded)
    rounded = torch.where(magnitude < 1.75, 1.5, rounded)
    rounded = torch.where(magnitude <= 1.25, 1.0, rounded)
    rounded = torch.where(magnitude < 0.75, 0.5, rounded)
    rounded = torch.where(magnitude <= 0.25, 0.0, rounded)
    return rounded.to(values.dtype) * sign


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 codes and E8M0 exponents of rows, as compressed-tensors' MXFP4 quantizer makes them.

    ``calculate_qparams`` on each group's min and max (``generate_mx_scales``: the
    group's largest magnitude rounded to a power of two, its exponent less 2, biased
    by 127, clamped to a byte; the scale ``2 ** (e - 127)`` in ``values``' dtype, 1 where
    that is 0), then ``quantize`` (``x / scale`` in that dtype, clamped to +-6, rounded
    to E2M1) and ``pack_fp4_to_uint8`` (element 2k in the low nibble), and
    ``compress_mx_scale`` for the stored exponent.

    Args:
        values: ``(rows, cols)``, ``cols`` a multiple of 32, in bfloat16, float16 or float32.

    Returns:
        ``(blocks, exponents)``: uint8 ``(rows, cols / 32, 16)`` and uint8 ``(rows, cols / 32)``.
    """
    rows, cols = values.shape
    dtype = values.dtype
    groups = values.view(rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
    zeros = torch.zeros((), dtype=dtype, device=values.device)
    low = torch.minimum(groups.amin(dim=-1), zeros)
    high = torch.maximum(groups.amax(dim=-1), zeros)
    largest = torch.maximum(low.abs(), high.abs())
    power = _round_to_power_of_two(largest)
    biased = E8M0_BIAS + torch.floor(torch.log2(power)) - E2M1_MAX_EXPONENT
    biased = torch.round(torch.clamp(biased, 0, E8M0_NAN)).to(torch.uint8).to(dtype)
    scale = (2.0 ** (biased.to(torch.int32) - E8M0_BIAS).to(torch.float)).to(dtype)
    scale = torch.where(scale == 0, torch.ones((), dtype=dtype, device=values.device), scale)
    scaled = torch.clamp(groups / scale.unsqueeze(-1), -E2M1_MAX, E2M1_MAX)
    e2m1 = _cast_to_e2m1(scaled)
    sign = torch.signbit(e2m1).to(torch.uint8)
    doubled = (e2m1 * 2).to(torch.int8).abs_()
    index = torch.zeros_like(doubled, dtype=torch.uint8)
    for twice, code in ((1, 1), (2, 2), (3, 3), (4, 4), (6, 5), (8, 6)):
        index[doubled == twice] = code
    index[doubled >= 12] = 7
    codes = (index | (sign << 3)).view(rows, cols // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    exponents = (E8M0_BIAS + torch.floor(torch.log2(scale)).to(torch.int32)).to(torch.uint8)
    return blocks.view(rows, cols // MXFP4_BLOCK, MXFP4_BYTES_PER_BLOCK), exponents
