"""Rigorous error bounds for the *_svd combinations, from floating-point error analysis.

lora-merge (float64) and PEFT (float32) compute the same thing: a combined delta
F = combine(wᵢ, ΔWᵢ) of the adapters' deltas ΔWᵢ = sᵢ Bᵢ Aᵢ, its best rank-r
approximation T = U_r Σ_r V_rᵀ (optionally with PEFT's ``svd_clamp`` on the factors), and
W + T rounded to the output dtype. On another CPU both get other bits (other SVD and matmul
kernels); what holds everywhere is that each is within a bound of the float64 reference
that depends only on the precision it computes in and on the conditioning of the SVD.
The bound has four parts:

1. The combination. With unit roundoff u, a float delta has error at most
   (r + 3) u sᵢ|Bᵢ||Aᵢ| (a length-r dot product, the scale, DARE's rescale), and the
   weighted sum or TIES mean adds (k + 2) u Σᵢ|wᵢ tᵢ| (Higham, *Accuracy and Stability of Numerical
   Algorithms*, §3.1). A decision (keep one of the top-k magnitudes, a task's sign, the
   elected sign) can come out otherwise than in exact arithmetic only where its deciding
   quantity is within that error of the threshold; at such an element any outcome is a
   sum or mean of a subset of the wᵢtᵢ, so it moves by at most |F| + Σᵢ|wᵢ|(|tᵢ| + errᵢ).
   The elementwise bounds give ||E||₂ <= ||E||_F.
2. The SVD. LAPACK's SVD is backward stable: the factors are the exact SVD of F + E', with
   ||E'||₂ <= p(m, n) u ||F||₂, p "a modestly growing function of m and n" (LAPACK Users'
   Guide, 3rd ed., §4.9, whose error bounds take p = 1). We take p = 10 max(m, n), and count
   it twice: once for the decomposition, once for its factors being orthogonal only to
   working precision. So the computed T is T_r(F + E) with ||E||₂ <= ε.
3. The truncation's conditioning. With gap δ = s_r - s_{r+1} of F and ε < δ, Wedin's sin θ
   theorem bounds the rotation of the top-r singular subspaces by ε / (δ - ε), so
   ||T_r(F + E) - T_r(F)||₂ <= ε + s_1 ε / (δ - ε), and every element is bounded by that
   spectral norm. With ``svd_clamp`` each factor column matters on its own: singular pair k
   turns by at most √2 ε / (g_k - ε), g_k its distance to the neighbouring singular values,
   and its sign is LAPACK's choice (see :func:`clamped_candidates`).
4. The merge: T's factors are multiplied and added to W in float32 (both PEFT and lora-merge
   for a 16-bit output) and rounded once to the output dtype: (r + 4) u₃₂ Σ_k|B_ik||A_kj| +
   u₃₂ |W + T| + half an ulp of the output. Σ_k|B_ik||A_kj| <= ||T_i,:||₂ when A has
   orthonormal rows (Cauchy-Schwarz: ||B_i,:||₂ = ||T_i,:||₂, and A's columns have norm <= 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from merge_oracle import ulp

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
FLOAT64_UNIT_ROUNDOFF = 2.0**-53


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype``'s numbers in [1, 2): the relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def svd_backward_error(matrix: torch.Tensor, unit: float) -> float:
    """Bound on ||E'||₂ for an SVD computed with unit roundoff ``unit`` (part 2 above)."""
    return 2 * 10 * max(matrix.shape) * unit * float(torch.linalg.matrix_norm(matrix, 2))


@dataclass(frozen=True)
class Task:
    """One adapter's contribution to a module: its weight, its exact (float64) delta after
    DARE's drop-and-rescale if any, |B||A| scaled alike, and its rank."""

    weight: float
    delta: torch.Tensor
    magnitude: torch.Tensor
    rank: int


def combination_error(
    tasks: Sequence[Task],
    combined: torch.Tensor,
    unit: float,
    trims: bool,
    density: float,
    elects_sign: bool,
    sign_method: str,
) -> torch.Tensor:
    """Elementwise bound on |computed combination - exact combination| (part 1 above).

    Args:
        tasks: the adapters that target the module, in order.
        combined: the exact combination F.
        unit: the unit roundoff the combination is computed with.
        trims: whether each task keeps only its top ``density`` magnitudes (TIES, magnitude_prune).
        density: the fraction kept by trimming.
        elects_sign: whether a TIES sign election and disjoint mean follow.
        sign_method: ``total`` or ``frequency``.
    """
    errors = [(task.rank + 3) * unit * task.magnitude for task in tasks]
    fragile = torch.zeros_like(combined, dtype=torch.bool)
    kept, kept_errors = [], []
    for task, error in zip(tasks, errors, strict=True):
        size = task.delta.abs()
        surely_kept = torch.ones_like(size, dtype=torch.bool)
        if trims:
            # Element i is surely among the top k when its lowest possible magnitude beats
            # the (k+1)-th largest highest possible one (then at most k - 1 others can beat
            # it), and surely not when its highest is below the k-th largest lowest one.
            keep = int(density * size.numel())
            low = (size - error).flatten().sort(descending=True).values
            high = (size + error).flatten().sort(descending=True).values
            if keep < size.numel():
                surely_kept = size - error > high[keep]
            surely_dropped = size + error < low[keep - 1]
            fragile |= ~(surely_kept | surely_dropped)
        # A surely dropped entry is an exact zero; a fragile one is already accounted for.
        kept.append(torch.where(surely_kept, task.delta, torch.zeros_like(task.delta)))
        kept_errors.append(torch.where(surely_kept, error, torch.zeros_like(error)))
        if elects_sign:
            fragile |= uncertain_sign(kept[-1].abs(), kept_errors[-1])
    if elects_sign and sign_method == "total":
        total = sum(kept)
        uncertainty = sum(kept_errors) + len(tasks) * unit * sum(t.abs() for t in kept)
        fragile |= uncertain_sign(total.abs(), uncertainty)
    largest_outcome = sum(
        abs(task.weight) * (task.delta.abs() + error)
        for task, error in zip(tasks, errors, strict=True)
    )
    arithmetic = sum(
        abs(task.weight) * error for task, error in zip(tasks, errors, strict=True)
    ) + (len(tasks) + 2) * unit * sum(abs(task.weight) * task.delta.abs() for task in tasks)
    return arithmetic + torch.where(
        fragile, combined.abs() + largest_outcome, torch.zeros_like(combined)
    )


def uncertain_sign(size: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Where a value of this size, computed with this error, may have either sign (an exact
    zero, e.g. dropped by DARE, computed without error, stays zero)."""
    return (size <= error) & (error > 0)


def perturbed_matrix_bound(combined: torch.Tensor, error: torch.Tensor, unit: float) -> float:
    """ε: ||E||₂ for the combination's error plus the SVD's backward error (parts 1 and 2)."""
    combination = float(torch.linalg.matrix_norm(error, "fro"))
    spectral = float(torch.linalg.matrix_norm(combined, 2))
    return combination + 2 * 10 * max(combined.shape) * unit * (spectral + combination)


def truncation_bound(singular_values: torch.Tensor, rank: int, epsilon: float) -> float:
    """||T_r(F + E) - T_r(F)||₂ for ||E||₂ <= ε (part 3 above, Wedin's theorem)."""
    sigma = [*singular_values.tolist(), 0.0]
    gap = sigma[rank - 1] - sigma[rank]
    assert gap > 2 * epsilon, (
        f"rank-{rank} truncation too ill-conditioned to compare: gap {gap:.3g}, error {epsilon:.3g}"
    )
    return epsilon + sigma[0] * epsilon / (gap - epsilon)


def merge_error(
    base: torch.Tensor,
    delta: torch.Tensor,
    factor_products: torch.Tensor,
    rank: int,
    unit: float = FLOAT32_UNIT_ROUNDOFF,
) -> torch.Tensor:
    """The product of the factors and its sum with W, in float32 for 16-bit outputs (``unit``
    float64's for 32-bit ones), before the final rounding (part 4 above);
    ``factor_products`` bounds Σ_k|B_ik||A_kj|."""
    return (rank + 4) * unit * factor_products + unit * (base.abs() + delta.abs())


@dataclass(frozen=True)
class ClampedCandidate:
    """W + T for one choice of the singular vectors' signs, with PEFT's clamp applied."""

    delta: torch.Tensor
    abs_lora_b: torch.Tensor  # |B| after clamping, (out, r)
    abs_lora_a: torch.Tensor  # |A| after clamping, (r, in)


def clamped_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, signs: Sequence[int], clamp: float
) -> ClampedCandidate:
    """PEFT's svd_clamp: B = U_r Σ_r, A = V_rᵀ, both clamped to ± the ``clamp`` quantile
    (linear interpolation) of all their signed entries."""
    flip = torch.tensor(signs, dtype=u.dtype)
    lora_b = u * s * flip
    lora_a = vh * flip.view(-1, 1)
    entries = torch.cat([lora_b.flatten(), lora_a.flatten()]).sort().values
    position = clamp * (entries.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, entries.numel() - 1)
    limit = float(entries[low] + (position - low) * (entries[high] - entries[low]))
    lora_b = lora_b.clamp(-limit, limit)
    lora_a = lora_a.clamp(-limit, limit)
    return ClampedCandidate(lora_b @ lora_a, lora_b.abs(), lora_a.abs())


def clamped_candidates(
    combined: torch.Tensor, rank: int, clamp: float
) -> tuple[list[ClampedCandidate], torch.Tensor]:
    """The clamped result for every sign choice of the r singular pairs, and the singular values.

    Clamping at a quantile of the *signed* entries depends on which sign LAPACK gives each
    singular pair (u_k, v_k) -> (-u_k, -v_k), which varies between LAPACK builds, CPUs and
    precisions; every choice is an equally valid result of PEFT's rule.
    """
    u, s, vh = torch.linalg.svd(combined, full_matrices=False)
    k = min(rank, s.numel())
    u, s_k, vh = u[:, :k], s[:k], vh[:k]
    candidates = [
        clamped_factors(u, s_k, vh, signs, clamp) for signs in itertools.product((1, -1), repeat=k)
    ]
    return candidates, s


def clamped_perturbation(
    candidate: ClampedCandidate,
    singular_values: torch.Tensor,
    rank: int,
    epsilon: float,
    unit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise bounds for a clamped result computed from F + E, ||E||₂ <= ε.

    Returns:
        The bound on |computed T - candidate T|, and on Σ_k|B_ik||A_kj| of the computed
        factors (for the merge's rounding).
    """
    sigma = [*singular_values.tolist(), 0.0]
    turns = []
    for k in range(rank):
        gap = min(sigma[k - 1] - sigma[k] if k else math.inf, sigma[k] - sigma[k + 1])
        assert gap > 2 * epsilon, f"singular value {k} too close to a neighbour to compare"
        turns.append(math.sqrt(2) * epsilon / (gap - epsilon))
    turn = torch.tensor(turns, dtype=torch.float64)
    b_error = epsilon + torch.tensor(sigma[:rank], dtype=torch.float64) * turn  # per column of B
    a_error = turn  # per row of A
    # The quantile moves by at most the largest entry's move (it is 1-Lipschitz in the
    # sup norm), plus its own rounding; clamp(x, -h, h) is 1-Lipschitz in x and in h.
    limit_error = float(torch.cat([b_error, a_error]).max()) + 4 * unit
    b_bound = candidate.abs_lora_b + (b_error + limit_error).view(1, -1)
    a_bound = candidate.abs_lora_a + (a_error + limit_error).view(-1, 1)
    products = b_bound @ a_bound
    return products - candidate.abs_lora_b @ candidate.abs_lora_a, products


def within(
    output: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor
) -> tuple[bool, float]:
    """Whether every element of ``output`` is within ``allowed`` + half an ulp of ``expected``;
    and the worst ratio of error to that allowance."""
    half_ulp = 0.5 * ulp(output, output.dtype)
    error = (output.double() - expected).abs()
    ratio = error / (allowed + half_ulp)
    return bool((ratio <= 1).all()), float(ratio.max())
