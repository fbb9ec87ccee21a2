"""B0 and A0 of the LoRA initialisations that can be recomputed from the base weight.

Tensors in, tensors out. Each reproduces PEFT's initialisation
(``peft/tuners/lora/layer.py``) operation for operation, in float32 as PEFT
computes it, so that on the machine and torch build that initialised the
adapter the result is PEFT's own; elsewhere LAPACK may round differently, by
float32 rounding errors of the decomposition (the product ``B0 @ A0``, which is
what the merge subtracts, does not depend on the signs LAPACK picks).
"""

from __future__ import annotations

import torch


def pissa_initial_factors(
    weight: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's B0 (out, r) and A0 (r, in): the top-r singular triplets of W, split evenly.

    PEFT's ``LoraLayer.pissa_init`` with ``init_lora_weights="pissa"``:
    ``V, S, Uh = svd(W.float(), full_matrices=False)``, ``Sr = S[:r] / scaling``,
    ``A0 = diag(sqrt(Sr)) @ Uh[:r]``, ``B0 = V[:, :r] @ diag(sqrt(Sr))``, so that
    ``scaling * B0 @ A0`` is W's best rank-r approximation.

    Args:
        weight: W as (out, in), in its stored dtype (converted to float32 here, as PEFT does).
        rank: r.
        scale: the adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
    """
    v, s, uh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    sr = s[:rank] / scale
    a0 = torch.diag(torch.sqrt(sr)) @ uh[:rank]
    b0 = v[:, :rank] @ torch.diag(torch.sqrt(sr))
    return b0, a0


def olora_initial_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's B0 (out, r) and A0 (r, in): the first r columns of Q and rows of R of W = QR.

    PEFT's ``LoraLayer.olora_init``: ``Q, R = qr(W.float())``, ``B0 = Q[:, :r]``,
    ``A0 = R[:r]`` (no division by the scaling: the residual is ``W - scaling * B0 @ A0``).

    Args:
        weight: W as stored, (out, in) (PEFT's OLoRA does not transpose Conv1D weights).
        rank: r.
    """
    q, r = torch.linalg.qr(weight.to(torch.float32))
    return q[:, :rank].contiguous(), r[:rank].contiguous()
