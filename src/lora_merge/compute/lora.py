"""The arithmetic every LoRA merge shares: ``W + scale * B @ A``, rounded once.

Tensors in, tensors out; no I/O, no globals. Which A and B a layer kind adds,
and in which layout, is the kind's business (:mod:`lora_merge.plan.kinds`);
here is how the sum is computed so that it is PEFT's, bit for bit.

PEFT (``peft/tuners/lora/layer.py``) merges a Linear layer as
``W += transpose(B @ A, fan_in_fan_out) * scaling``. With the adapter in float32
(PEFT's default ``autocast_adapter_dtype=True``) the in-place add into a 16-bit
weight runs in float32 and rounds once, so computing
``W.float() + scale * (B.float() @ A.float())`` and rounding once reproduces it
bit for bit.

For 32-bit outputs we compute in float64: float32 arithmetic would round the
product and the sum at float32 precision, i.e. at the output's own precision,
so the result could be off by more than half a unit in the last place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def scale_folds_into_a(scale: float) -> bool:
    """Whether :func:`prepare_lora_factors` multiplies A by the scale (unless that overflows).

    Only a power of two >= 1 in magnitude (negative for --unmerge) leaves every
    product and partial sum bit for bit as PEFT's ``(B @ A) * scale``.
    """
    mantissa, _ = math.frexp(scale)
    return abs(scale) >= 1.0 and abs(mantissa) == 0.5


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
    if scale_folds_into_a(scale) and lora_a.numel():
        # A * scale overflows exactly where the largest |a| does: checking A's extremes
        # needs no (r, in) temporaries (isfinite over the folded A makes three, which
        # for an embedding's A is more memory than A itself). NaN or Inf in A
        # propagate to the extremes; such an A is folded, its result is non-finite anyway.
        extremes = torch.stack(torch.aminmax(lora_a))
        if not bool(torch.isfinite(extremes).all()) or bool(torch.isfinite(extremes * scale).all()):
            return LoraFactors(lora_a * scale, lora_b, 1.0, transposed)
    return LoraFactors(lora_a, lora_b, scale, transposed)


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


def _overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to infinity in ``dtype``: the midpoint above its
    largest finite value, ``(2 - eps/2) * 2**emax`` where that is ``(2 - eps) * 2**emax``."""
    info = torch.finfo(dtype)
    return math.ldexp(2.0 - info.eps / 2, math.frexp(info.max)[1] - 1)


# rounds_to_finite's constants, per output dtype: T²/4 (exact in float64: T has at most
# 25 significant bits); per compute dtype: the most terms for which n·u <= 1/2.
_SQUARES_BOUND = {
    dtype: _overflow_threshold(dtype) ** 2 / 4
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
}
_MOST_TERMS = {dtype: int(1 / torch.finfo(dtype).eps) for dtype in (torch.float32, torch.float64)}


def rounds_to_finite(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """True only when every value, rounded once to ``dtype``, is certainly finite.

    The merge's check for NaN/Inf in one pass over the float32 (float64) values
    before their rounding, instead of a second pass over the rounded ones: a dot
    product, ~0.05 ns per float32 element against 0.19 for summing the rounded
    bfloat16 values (measured, one core). False proves nothing: the caller then
    checks the rounded values with :func:`all_finite`.

    Why it is a proof. Let T be the smallest magnitude that rounds to infinity in
    ``dtype`` (bfloat16: 0x7F7F8000 as float32; float16: 65520); T² is exact in
    float64. A computed sum S of n non-negative terms, in any order, with or without
    fused multiply-adds, is at least (1 - n·u) times their exact sum (u: the unit
    roundoff; Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    §4.2; a square that underflows loses less than 2^-126 more, nothing beside T²),
    so with n·u <= 1/2 the exact sum of squares is at most 2·S. NaN or ±Inf
    make S NaN or Inf, and a square too large for the compute dtype makes it Inf.
    So S < T²/4 gives x² < T² for every x: each value is finite and rounds to a
    finite value (rounding is monotonic).

    Args:
        values: the merged values in the compute dtype (float32 or float64),
            contiguous; anything else returns False.
        dtype: the output dtype: bfloat16, float16 or float32 (anything else
            returns False).
    """
    bound = _SQUARES_BOUND.get(dtype)
    terms = _MOST_TERMS.get(values.dtype)
    if bound is None or terms is None or values.numel() > terms or not values.is_contiguous():
        return False
    flat = values.view(-1)
    return float(torch.dot(flat, flat)) < bound


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
