"""Combining several LoRA adapters' tensors of one module. Tensors in, tensors out.

The operators reproduce PEFT's ``peft/utils/merge_utils.py`` (task arithmetic,
magnitude pruning, TIES, DARE) with the same torch operations in the same
order, so that, on the same float32 inputs, they give the same bits; the
random ones draw their keep-masks from a caller's ``torch.Generator`` instead
of torch's global RNG. :func:`truncated_svd` reproduces the truncation of
PEFT's ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lora_merge.compute.combine_names import Form
from lora_merge.compute.combine_names import Operator as Operator
from lora_merge.compute.combine_names import SignMethod as SignMethod


def keep_mask(shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """A DARE keep-mask: each element 1 with probability ``density``, else 0 (float32, CPU).

    Always drawn on the CPU from float32 probabilities (the dtype changes the
    draws), so one seed gives the same mask whatever the device or the dtype of
    the tensor it prunes.
    """
    return torch.bernoulli(torch.full(shape, density, dtype=torch.float32), generator=generator)


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude elements, zero the rest.

    PEFT ``magnitude_based_pruning``; a density of 1 or more keeps everything (``prune``).
    """
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(
    tensor: torch.Tensor, density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each element with probability ``density``, divide by it.

    PEFT ``random_pruning(rescale=True)``; a density of 1 or more keeps everything.
    """
    if density >= 1:
        return tensor
    mask = keep_mask(tuple(tensor.shape), density, generator).to(tensor.dtype)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod) -> torch.Tensor:
    """TIES sign election over dim 0: where each task agrees with the elected sign.

    ``total``: the sign of the summed values; ``frequency``: the sign most tasks
    have. Zero elects +1 (PEFT ``calculate_majority_sign_mask``). Zeros (pruned
    entries) agree with neither sign.
    """
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def combine_task_tensors(
    operator: Operator,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float = 1.0,
    sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine same-shaped task tensors with one of PEFT's operators.

    Args:
        operator: ``linear`` (Σ wᵢtᵢ), ``magnitude_prune`` (Σ wᵢ·trim(tᵢ)),
            ``ties`` (trim, elect sign on the unweighted trimmed tensors, weighted
            mean of the agreeing entries), ``dare_linear`` / ``dare_ties`` (as
            linear / ties with DARE's random drop-and-rescale instead of trimming).
        tensors: one per task, same shape and dtype.
        weights: one per task, a 1-D tensor of the tensors' dtype.
        density: fraction kept by the pruning step.
        sign_method: TIES sign election, ``total`` or ``frequency``.
        generator: the source of DARE's masks, drawn task by task in order.

    Returns:
        The combined tensor.
    """
    if operator in ("dare_linear", "dare_ties"):
        if generator is None:
            raise ValueError("DARE needs a generator for its masks")
        tensors = [randomly_pruned(t, density, generator) for t in tensors]
    elif operator in ("ties", "magnitude_prune"):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if operator in ("ties", "dare_ties"):
        agrees = majority_sign_mask(stacked, sign_method)
        # PEFT disjoint_merge: the mean over the tasks that agree (at least one in the divisor).
        return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def factor_weights(weight_times_scale: float) -> tuple[float, float]:
    """PEFT's per-factor weights when A and B are combined separately: ``(±√|ws|, √|ws|)``.

    ``B' A'`` then carries ``w·s`` once; the sign goes on A only, or two negative
    weights would cancel (``_generalized_task_arithmetic_weighted_adapter``).
    """
    root = math.sqrt(abs(weight_times_scale))
    return (root if weight_times_scale >= 0 else -root), root


def truncated_svd(
    delta: torch.Tensor, rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in) and B (out, k) with ``B @ A`` the best rank-``k`` approximation of ``delta``.

    ``B = U_k diag(S_k)`` and ``A = V_kᵀ`` as PEFT (after kohya-ss' svd_merge_lora);
    ``k = min(rank, out, in)``. With ``clamp`` (a quantile in (0, 1]) the entries
    of both are clamped to ±(that quantile of all their entries), as PEFT's
    ``svd_clamp``. The reduced SVD gives the same leading vectors as PEFT's
    ``full_matrices=True`` without its (out, out) U.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(u, s, vh, rank, clamp)


def truncated_svd_of_product(
    lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`truncated_svd` of ``lora_b @ lora_a`` without forming the (out, in) product.

    ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR), so ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``
    and the SVD of the small ``R_b R_aᵀ`` gives that of ``B A``: memory grows with
    (out + in) · rank, not out · in.
    """
    q_b, r_b = torch.linalg.qr(lora_b)
    q_a, r_a = torch.linalg.qr(lora_a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return _truncate(q_b @ u, s, vh @ q_a.T, rank, clamp)


def _truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, clamp: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(rank, s.numel())
    lora_b = u[:, :k] @ torch.diag(s[:k])
    lora_a = vh[:k, :]
    if clamp is not None:
        high = quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), clamp)
        lora_b = lora_b.clamp(-high, high)
        lora_a = lora_a.clamp(-high, high)
    return lora_a.contiguous(), lora_b.contiguous()


def combined_factors(
    form: Form,
    operator: Operator,
    factors_a: Sequence[torch.Tensor],
    factors_b: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    *,
    rank: int,
    density: float,
    sign_method: SignMethod,
    svd_clamp: float | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A and B of one module combined from several adapters' (see lora_merge.adapter.recipe).

    Args:
        form: ``cat``, ``factors``, ``svd`` or ``full``.
        operator: PEFT's operator applied in that form.
        factors_a: each adapter's A (r_i, in), as read.
        factors_b: each adapter's B (out, r_i), as read.
        weights: each adapter's weight.
        scales: each adapter's LoRA scale for this module.
        rank: the rank an ``svd`` form truncates to.
        density: the fraction pruning keeps.
        sign_method: TIES's sign election.
        svd_clamp: the quantile an ``svd`` form clamps at, or None.
        generator: DARE's random source for this module (None for other operators).

    Returns:
        (A, B), or (the whole delta, None) for the ``full`` form.
    """
    # A clamp depends on the signs LAPACK gives the singular vectors (PEFT clamps at a
    # quantile of the signed entries), so with one the SVD is taken of the full delta, as
    # PEFT does; without, of the low-rank product (same result, bounded memory).
    low_rank_svd = form == "svd" and operator == "linear" and svd_clamp is None
    if form == "cat" or low_rank_svd:
        # [w₁s₁A₁; w₂s₂A₂] and [B₁ B₂]: their product is Σ wᵢsᵢBᵢAᵢ exactly (PEFT "cat").
        lora_a = torch.cat(
            [a.double() * (w * s) for a, w, s in zip(factors_a, weights, scales, strict=True)]
        )
        lora_b = torch.cat([b.double() for b in factors_b], dim=1)
        if form == "cat":
            return lora_a, lora_b
        # Plain svd: the truncated SVD of that product, without forming (out, in).
        return truncated_svd_of_product(lora_b, lora_a, rank, svd_clamp)

    if form == "factors":
        # PEFT _generalized_task_arithmetic_weighted_adapter: √|wᵢsᵢ| on each factor,
        # the sign on A; float32 throughout as PEFT's float32 adapters.
        split = [factor_weights(w * s) for w, s in zip(weights, scales, strict=True)]
        weights_a = torch.tensor([s[0] for s in split], dtype=torch.float32)
        weights_b = torch.tensor([s[1] for s in split], dtype=torch.float32)
        lora_a = combine_task_tensors(
            operator, [a.float() for a in factors_a], weights_a, density, sign_method, generator
        )
        lora_b = combine_task_tensors(
            operator, [b.float() for b in factors_b], weights_b, density, sign_method, generator
        )
        return lora_a, lora_b

    # svd and full: the operator on each adapter's whole delta ΔWᵢ = sᵢ Bᵢ Aᵢ (out, in).
    deltas = [
        (b.double() @ a.double()) * s for a, b, s in zip(factors_a, factors_b, scales, strict=True)
    ]
    combined = combine_task_tensors(
        operator,
        deltas,
        torch.tensor(list(weights), dtype=torch.float64),
        density,
        sign_method,
        generator,
    )
    del deltas
    if form == "full":
        return combined, None
    return truncated_svd(combined, rank, svd_clamp)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile with linear interpolation, as ``torch.quantile``'s default.

    Sorting directly, because ``torch.quantile`` refuses inputs of more than 2²⁴
    elements (an embedding's factors can have more).
    """
    ordered = torch.sort(values.flatten().double()).values
    position = q * (ordered.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    fraction = position - low
    return float(ordered[low] + fraction * (ordered[high] - ordered[low]))
