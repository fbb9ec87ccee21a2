"""LoRA merge formulas. Tensors in, tensors out; no I/O, no globals.

PEFT (``peft/tuners/lora/layer.py``) merges a Linear layer as
``W += transpose(B @ A, fan_in_fan_out) * scaling``. With the adapter in float32
(PEFT's default ``autocast_adapter_dtype=True``) the in-place add into a 16-bit
weight runs in float32 and rounds once, so computing
``W.float() + scale * (B.float() @ A.float())`` and rounding once reproduces it
bit for bit. For Embedding layers PEFT casts the delta to the weight's dtype
before adding (two roundings); we round once, which is never further from the
exact sum.

For 32-bit outputs we compute in float64: float32 arithmetic would round the
product and the sum at float32 precision, i.e. at the output's own precision,
so the result could be off by more than half a unit in the last place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The arithmetic, in one line, for the model card and shard metadata.
MERGE_ARITHMETIC = (
    "W + scale * B @ A per module (PEFT's merge), computed in float32 (float64 for "
    "32-bit outputs) and rounded once to the output dtype"
)
UNMERGE_ARITHMETIC = (
    "--unmerge: W - scale * B @ A per module (the adapter removed; the scales listed are "
    "negated), computed in float32 (float64 for 32-bit outputs) and rounded once"
)


# No "|" in it: the model card shows it in a Markdown table.
DORA_ARITHMETIC = (
    "DoRA modules: m / norm(V) * V with V = W + scale * B @ A and one norm per output feature"
)


def merge_arithmetic(has_dora: bool) -> str:
    """:data:`MERGE_ARITHMETIC`, plus DoRA's rescaling when the adapter has DoRA modules."""
    return f"{MERGE_ARITHMETIC}; {DORA_ARITHMETIC}" if has_dora else MERGE_ARITHMETIC


def compute_dtype_for(output_dtype: torch.dtype) -> torch.dtype:
    """The dtype the merge is computed in before the one final rounding.

    At least twice the output's significand bits, so that the final rounding to
    ``output_dtype`` is what decides the result: float32 for 16-bit outputs
    (8 or 11 bits -> 24), float64 for 32- and 64-bit outputs.
    """
    if output_dtype in (torch.float16, torch.bfloat16) or output_dtype.itemsize < 2:
        return torch.float32
    return torch.float64


@dataclass(frozen=True)
class LoraFactors:
    """A and B of one module, ready for :func:`merged_rows`.

    Attributes:
        lora_a: A (r, in) in the compute dtype, possibly pre-multiplied by the scale;
            or, when ``lora_b`` is None, the whole delta (out, in).
        lora_b: B (out, r) in the compute dtype, or None for a whole delta.
        scale: the factor still to apply to ``B @ A`` (1.0 when folded into A).
        transposed: the stored weight is ``(B @ A).T``-shaped (Conv1D, embeddings).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor | None
    scale: float
    transposed: bool


def prepare_lora_factors(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor | None,
    scale: float,
    transposed: bool,
    compute_dtype: torch.dtype,
) -> LoraFactors:
    """Convert A and B to the compute dtype, folding the scale into A when that is exact.

    PEFT computes ``(B @ A) * scale``. When the scale is ± a power of two (alpha = 2r,
    the most common setting, gives 2.0) multiplying A by it first changes no bit of
    any product or partial sum, provided nothing overflows, which is checked; it
    saves one pass over every merged weight. Other scales are applied after the
    product, as PEFT does.
    """
    lora_a = lora_a.to(compute_dtype)
    lora_b = None if lora_b is None else lora_b.to(compute_dtype)
    mantissa, _ = math.frexp(scale)
    # A power of two >= 1 in magnitude (negative for --unmerge): exact unless it overflows.
    if abs(scale) >= 1.0 and abs(mantissa) == 0.5 and lora_a.numel():
        # A * scale overflows exactly where the largest |a| does: checking A's extremes
        # needs no (r, in) temporaries (isfinite over the folded A makes three, which
        # for an embedding's A is more memory than A itself). NaN or Inf in A
        # propagate to the extremes; such an A is folded, its result is non-finite anyway.
        extremes = torch.stack(torch.aminmax(lora_a))
        if not bool(torch.isfinite(extremes).all()) or bool(torch.isfinite(extremes * scale).all()):
            return LoraFactors(lora_a * scale, lora_b, 1.0, transposed)
    return LoraFactors(lora_a, lora_b, scale, transposed)


def expert_lora_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int, experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of one expert of a LoRA on fused expert weights (PEFT ``lora.ParamWrapper``).

    PEFT's ``ParamWrapper.get_delta_weight`` reshapes A (r·E, in) to (E, r, in)
    and B (out, r·E) to (out, r, E): expert e takes the consecutive rows
    ``e·r:(e+1)·r`` of A and the interleaved columns ``e::E`` of B.

    Args:
        lora_a: A of every expert, (r·E, in), or just this expert's (r, in) rows.
        lora_b: B of every expert, (rows, r·E).
        expert / experts: e and E.

    Returns:
        (A_e (r, in), B_e (rows, r)), B_e contiguous.
    """
    rank = lora_b.shape[1] // experts
    if lora_a.shape[0] != rank:
        lora_a = lora_a[expert * rank : (expert + 1) * rank]
    return lora_a, lora_b[:, expert::experts].contiguous()


def expand_merged_linear_b(lora_b: torch.Tensor, groups: tuple[bool, ...]) -> torch.Tensor:
    """B of a loralib ``MergedLinear`` as the (out, r·k) matrix whose product with A is its delta.

    loralib's ``merge_AB`` is ``zero_pad(conv1d(A, B, groups=k))``: enabled group j
    (in order) gets ``B[j·n:(j+1)·n] @ A[j·r:(j+1)·r]`` (n = out / len(groups)) and
    disabled groups get zeros. Placing each B block at its group's rows and its
    A block's columns gives the same product with a plain matmul; the extra terms
    are exact zeros, which change no sum.

    Args:
        lora_b: (n·k, r), the enabled groups' rows stacked.
        groups: ``enable_lora``, k of them true.

    Returns:
        (n·len(groups), r·k), zeros outside the blocks.
    """
    rank, enabled = lora_b.shape[1], sum(groups)
    group_rows = lora_b.shape[0] // enabled
    full = lora_b.new_zeros((group_rows * len(groups), rank * enabled))
    block = 0
    for group, is_enabled in enumerate(groups):
        if is_enabled:
            rows = slice(group * group_rows, (group + 1) * group_rows)
            full[rows, block * rank : (block + 1) * rank] = lora_b[
                block * group_rows : (block + 1) * group_rows
            ]
            block += 1
    return full


def lora_delta_rows(
    factors: LoraFactors, start: int, stop: int, workspace: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``start:stop`` of the stored-layout delta ``scale * B @ A`` (or its transpose).

    Args:
        factors: A, B, the scale and the layout (see :func:`prepare_lora_factors`).
        start / stop: row range of the stored weight.
        workspace: optional buffer for the product, shaped ``(stop - start, in)``,
            or ``(out, stop - start)`` when transposed; reusing one avoids
            allocating (and page-faulting) a fresh buffer per tile.

    Returns:
        ``stop - start`` rows in the compute dtype. The product is taken as PEFT
        takes it (``B @ A``, then ``* scale``) so that the float32 result is the
        same number.
    """
    if factors.lora_b is None:  # a whole delta: its rows, copied so the caller may add in place
        rows = factors.lora_a[:, start:stop].T if factors.transposed else factors.lora_a[start:stop]
        product = rows.clone() if workspace is None else _copy_rows(rows, workspace, factors)
    elif factors.transposed:
        product = torch.mm(factors.lora_b, factors.lora_a[:, start:stop], out=workspace).T
    else:
        product = torch.mm(factors.lora_b[start:stop], factors.lora_a, out=workspace)
    if factors.scale != 1.0:
        product.mul_(factors.scale)
    return product


def _copy_rows(rows: torch.Tensor, workspace: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
    """``rows`` copied into the workspace (laid out as the product's would be)."""
    if factors.transposed:
        return workspace.copy_(rows.T).T
    return workspace.copy_(rows)


def merged_rows(
    base_rows: torch.Tensor,
    factors: LoraFactors,
    start: int,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of ``V = W + scale * B @ A`` in the compute dtype, not yet rounded.

    Args:
        base_rows: rows ``start:start + len(base_rows)`` of the stored weight W,
            2-D (a convolution's rows flattened to (rows, -1)).
        factors: from :func:`prepare_lora_factors`.
        start: the first row ``base_rows`` covers.
        workspace: optional reusable buffer for the product (see :func:`lora_delta_rows`).
    """
    delta = lora_delta_rows(factors, start, start + base_rows.shape[0], workspace)
    # The stored dtype is widened exactly inside the add (PEFT's ``W + delta``
    # with a float32 delta is the same float32 sum).
    return delta.add_(base_rows)


def dora_scale_rows(values: torch.Tensor, magnitude_rows: torch.Tensor) -> torch.Tensor:
    """In place: each row of ``V`` times ``m / ||row||``; returns ``values``.

    DoRA with one output feature per stored row (Linear, convolutions). PEFT's
    ``DoraLinearVariant.merge_unsafe``: ``weight_norm = torch.linalg.norm(W + delta,
    dim=1)`` in the delta's float32, ``dora_factor = m / weight_norm``, then
    ``dora_factor.view(-1, 1) * (W + delta)``, rounded once. Same operations,
    same order, so 16-bit results are PEFT's.
    """
    norms = torch.linalg.vector_norm(values, dim=1)
    return values.mul_((magnitude_rows.to(values.dtype) / norms).unsqueeze(1))


def column_sums_of_squares(values: torch.Tensor) -> torch.Tensor:
    """Per-column sums of squares of a tile of ``V``, in float64 (first pass of a column norm).

    DoRA on an embedding or a Conv1D weight normalises columns of the stored
    weight, and a column spans every row: the squares are summed tile by tile in
    float64, so the order of the tiles does not matter at the output's precision.
    """
    return values.to(torch.float64).square_().sum(dim=0)


def dora_column_factor(magnitude: torch.Tensor, sums_of_squares: torch.Tensor) -> torch.Tensor:
    """``m / ||column||`` for every column, in float64, from :func:`column_sums_of_squares`.

    PEFT's ``DoraEmbeddingVariant`` (and the fan_in_fan_out Linear) take
    ``torch.linalg.norm(W.T + delta.T, dim=1)`` in float32; we take the same norm
    in float64 (see :func:`dora_scale_columns`).
    """
    return magnitude.to(torch.float64) / sums_of_squares.sqrt()


def dora_scale_columns(values: torch.Tensor, column_factor: torch.Tensor) -> torch.Tensor:
    """Each column of a tile of ``V`` times its factor, in float64 (not yet rounded).

    PEFT computes ``dora_factor.view(1, -1) * (W + delta)`` in float32, rounding the
    norm, the factor and the product before the final rounding; the stream computes
    column DoRA in float64 throughout, so the one final rounding decides the result.
    """
    return values.to(torch.float64).mul_(column_factor)


def round_float64_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded once to ``dtype`` (correctly rounded, ties to even).

    torch converts float64 to bfloat16/float16 through float32, rounding twice: a
    value just off a 16-bit rounding midpoint can land on it in float32 and then
    go the wrong way. Rounding to float32 *to odd* first (truncate, then set the
    last bit when anything was dropped) keeps the information the second
    rounding needs, so float32 -> 16-bit is then the correct rounding (Boldo and
    Melquiond, "Emulation of FMA and correctly rounded sums", 2008).
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return values.to(dtype)
    nearest = values.to(torch.float32)
    widened = nearest.to(torch.float64)
    inexact = widened != values
    bits = nearest.view(torch.int32).clone()
    # Rounded away from zero: step back one float32 toward zero (the sign is a separate
    # bit, so decrementing the integer view shrinks the magnitude for either sign).
    bits -= (inexact & (widened.abs() > values.abs()) & torch.isfinite(nearest)).to(torch.int32)
    bits |= inexact.to(torch.int32)
    return bits.view(torch.float32).to(dtype)


def merge_lora_bias(
    base_bias: torch.Tensor, lora_bias: torch.Tensor, scale: float, output_dtype: torch.dtype
) -> torch.Tensor:
    """``bias + scale * lora_B.bias``, rounded once (PEFT ``lora_bias=True``)."""
    compute_dtype = compute_dtype_for(output_dtype)
    delta = lora_bias.to(compute_dtype).mul(scale)
    return delta.add_(base_bias).to(output_dtype)


def all_finite(values: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf.

    A sum is finite only if every term is (NaN and Inf propagate), and summing
    is ~40x faster on CPU than ``isfinite(...).all()`` (0.05 vs 2.1 ns per
    bf16 element measured). A non-finite sum may still come from finite values
    that overflow when added, so that case is settled exactly.
    """
    if not values.is_floating_point():
        return True
    accumulator = torch.float64 if values.dtype == torch.float64 else torch.float32
    if math.isfinite(float(values.sum(dtype=accumulator))):
        return True
    return bool(torch.isfinite(values).all())
