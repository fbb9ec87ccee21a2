"""What the stream calls to merge a tile of a weight an AdaLoRA, IA3, LoHa or LoKr module changes.

:func:`tuner_row_merger` reads the module's tensors once per weight and returns a
function of a tile of the weight's rows (2-D, a convolution's rows flat) that
gives the merged rows in the compute dtype, not yet rounded: the caller rounds
once to the output dtype, as for LoRA.
"""

from __future__ import annotations

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
) -> RowMerger:
    """``rows(base_rows, start)``: rows ``start:`` of the merged weight, not yet rounded."""
    read = {role: adapter.read_rows(key) for role, key in update.keys}
    if update.projections is not None:  # VeRA saved without A and B: drawn as PEFT draws them
        seed, *sizes = update.projections
        drawn = vera.regenerated_projections(seed, (sizes[0], sizes[1], sizes[2]))
        if update.projection_dtype is not None:  # rounded to the base layer's dtype, as PEFT
            drawn = {role: t.to(update.projection_dtype) for role, t in drawn.items()}
        read.update(drawn)
    tensors = {role: t.to(device=device, dtype=compute_dtype) for role, t in read.items()}
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
    if update.tuner == oft.TUNER:  # R's blocks, and a tile rotated
        held += 4 * compute_dtype.itemsize * math.prod(adapter.shape(update.keys[0][1])) * 2
    elif update.tuner != ia3.TUNER:  # the products, the delta and its kron/einsum temporaries
        held += 3 * compute_dtype.itemsize * math.prod(weight_shape)
    return held
