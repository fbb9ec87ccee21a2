"""What the stream calls to merge a tile of a weight an AdaLoRA, IA3, LoHa or LoKr module changes.

:func:`tuner_row_merger` reads the module's tensors once per weight and returns a
function of a tile of the weight's rows (2-D, a convolution's rows flat) that
gives the merged rows in the compute dtype, not yet rounded: the caller rounds
once to the output dtype, as for LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from lora_merge.compute.lora import compute_dtype_for
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.tuners import adalora, ia3, loha, lokr, oft, vera

RowMerger = Callable[[torch.Tensor, int], torch.Tensor]

_DELTAS = {
    adalora.TUNER: adalora.adalora_delta,
    loha.TUNER: loha.loha_delta,
    lokr.TUNER: lokr.lokr_delta,
    vera.TUNER: vera.vera_delta,
}
# How PEFT names each type, for reports and the model card.
TUNER_NAMES = {
    adalora.TUNER: "AdaLoRA",
    ia3.TUNER: "IA3",
    loha.TUNER: "LoHa",
    lokr.TUNER: "LoKr",
    oft.TUNER: "OFT",
    vera.TUNER: "VeRA",
}
FORMULAS = {
    adalora.TUNER: adalora.FORMULA,
    ia3.TUNER: ia3.FORMULA,
    loha.TUNER: loha.FORMULA,
    lokr.TUNER: lokr.FORMULA,
    oft.TUNER: oft.FORMULA,
    vera.TUNER: vera.FORMULA,
}


def tuner_arithmetic(tuners: list[str]) -> str:
    """The merge, in one line, for the model card and shard metadata (no "|": a table cell)."""
    formulas = "; ".join(FORMULAS[tuner] for tuner in tuners)
    return (
        f"{formulas}; PEFT's operations in PEFT's order, in float32 (float64 for 32-bit "
        "outputs of LoHa/LoKr), rounded once to the output dtype"
    )


def tuner_compute_dtype(update: TunerUpdate, output_dtype: torch.dtype) -> torch.dtype:
    """The dtype a module's update is computed in before the one rounding."""
    if update.tuner == ia3.TUNER:
        return ia3.compute_dtype_for_ia3(output_dtype)
    if update.tuner == oft.TUNER:  # the Cayley transform is not exact in float32
        return torch.float64
    return compute_dtype_for(output_dtype)


def tuner_row_merger(
    update: TunerUpdate,
    adapter: TensorSource,
    weight_shape: tuple[int, ...],
    compute_dtype: torch.dtype,
    device: torch.device,
    absolute: bool = False,
) -> RowMerger:
    """``rows(base_rows, start)``: rows ``start:`` of the merged weight, not yet rounded.

    With ``absolute`` (for ``--verify``'s error bound), every adapter tensor, the scale
    and OFT's rotation are taken by absolute value: given ``|W|``, the rows are the sums
    of absolute terms that bound each element's rounding error.
    """
    read = {role: adapter.read_rows(key) for role, key in update.keys}
    if update.projections is not None:  # VeRA saved without A and B: drawn as PEFT draws them
        seed, *sizes = update.projections
        drawn = vera.regenerated_projections(seed, (sizes[0], sizes[1], sizes[2]))
        if update.projection_dtype is not None:  # rounded to the base layer's dtype, as PEFT
            drawn = {role: t.to(update.projection_dtype.torch) for role, t in drawn.items()}
        read.update(drawn)
    tensors = {role: t.to(device=device, dtype=compute_dtype) for role, t in read.items()}
    if absolute:
        tensors = {role: t.abs() for role, t in tensors.items()}
        update = dataclasses.replace(update, scale=abs(update.scale))
    row_elements = max(1, math.prod(weight_shape[1:]))
    if update.tuner == ia3.TUNER:
        factor, per_row = ia3.ia3_factor(update, tensors["ia3_l"], row_elements, compute_dtype)

        def scaled(base_rows: torch.Tensor, start: int) -> torch.Tensor:
            return ia3.scaled_rows(base_rows, factor, per_row, start, update.unmerge)

        return scaled
    if update.tuner == oft.TUNER:
        assert update.oft is not None
        blocks = row_elements // (oft.block_size_of(tensors["oft_R"].shape[-1]) or 1)
        rotation = oft.rotation_blocks(tensors["oft_R"], update.oft, blocks)
        if update.unmerge:
            rotation = oft.unmerge_blocks(rotation)
        if absolute:
            rotation = rotation.abs()

        def rotated(base_rows: torch.Tensor, start: int) -> torch.Tensor:
            return oft.rotated_rows(base_rows, rotation)

        return rotated
    # AdaLoRA, LoHa, LoKr, VeRA: the whole delta as PEFT builds it, then PEFT's ``W + delta`` per tile.
    delta = _DELTAS[update.tuner](tensors, update, weight_shape)
    delta = delta.reshape(weight_shape[0], row_elements)
    del tensors

    def added(base_rows: torch.Tensor, start: int) -> torch.Tensor:
        return delta[start : start + base_rows.shape[0]] + base_rows

    return added


# Roles whose leading dimension is a rank (the length of the sums the merge takes).
_RANK_ROLES = (
    "hada_w1_b",
    "hada_t1",
    "lokr_w1_b",
    "lokr_w2_b",
    "lokr_t2",
    "lora_A",
    "vera_lambda_d",
)


def tuner_sum_terms(update: TunerUpdate, adapter: TensorSource) -> int:
    """A bound on the operations behind each merged element, for ``--verify``'s error bound.

    A sum of n products is off by at most n·u of its absolute terms (Higham, eq. 3.5):
    n is the rank (its square for a CP einsum, which sums over two ranks; an OFT block's
    size for its rotation, b² for R's own Cayley series); each type adds a few roundings
    of its own (LoHa two products, a Hadamard product, a scale and a sum: 2n + 3), which
    ``2n + 8`` covers for every type.
    """
    if update.tuner == oft.TUNER:
        block = oft.block_size_of(adapter.shape(update.keys[0][1])[-1]) or 1
        return block * block + 2 * block + 8
    ranks = [adapter.shape(key)[0] for role, key in update.keys if role in _RANK_ROLES]
    rank = max(ranks, default=1)
    if any(role in ("hada_t1", "lokr_t2") for role, _ in update.keys):
        rank *= rank
    return 2 * rank + 8


def tuner_delta_bytes(
    update: TunerUpdate,
    adapter: TensorSource,
    weight_shape: tuple[int, ...],
    compute_dtype: torch.dtype,
) -> int:
    """What :func:`tuner_row_merger` holds for a weight: the tensors read, in two dtypes,
    and an additive type's whole delta."""
    held = 0
    for _, key in update.keys:
        elements = math.prod(adapter.shape(key))
        held += (adapter.dtype(key).itemsize + compute_dtype.itemsize) * elements
    if update.tuner == oft.TUNER:  # R's blocks (row_elements x b): R, Q, a power, inv(R)
        block = oft.block_size_of(adapter.shape(update.keys[0][1])[-1]) or 1
        held += 4 * compute_dtype.itemsize * math.prod(weight_shape[1:]) * block
    elif update.tuner != ia3.TUNER:  # the products, the delta and its kron/einsum temporaries
        held += 3 * compute_dtype.itemsize * math.prod(weight_shape)
    return held
