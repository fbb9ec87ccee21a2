"""DoRA (weight-decomposed LoRA) on a Linear, Conv1D, embedding or convolution.

Reproduces PEFT's ``DoraLinearVariant``, ``DoraEmbeddingVariant`` and
``_DoraConvNdVariant`` (``merge_unsafe`` in ``peft/tuners/lora/variants.py``):
with ``V = W + scale * B @ A`` (the layer kind's own product) the merged weight
is ``m / ||V|| * V``, one norm per output feature, ``m`` the saved
``lora_magnitude_vector``.

Shape rule (:func:`plan_dora`): m has one value per output feature (B's rows):
(out,) for Linear and Embedding; PEFT's convolutions keep the norm's dimensions,
(1, out, 1, ...).

Formula: where an output feature is a row of the stored weight (Linear,
convolutions) each tile's rows are rescaled as they are merged
(:func:`dora_scale_rows`, PEFT's operations in PEFT's order). Where it is a column
(embeddings, Conv1D: :func:`norm_per_column`) a column spans every row, so a
first pass over the tiles sums each column's squares
(:func:`column_sums_of_squares`), in float64, and the second rescales
(:func:`dora_column_factor`, :func:`dora_scale_columns`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lora_merge.errors import AdapterMismatchError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import DORA_PREFIX, LoraProduct

# torch is imported by the functions that compute values: a plan, made before
# torch is imported, needs none of it (issue 24).
if TYPE_CHECKING:
    import torch


def plan_dora(product: LoraProduct, shapes: LoraShapes, adapter: TensorSource) -> LoraProduct:
    """``product`` (a Linear's, Conv1D's, embedding's or convolution's) made DoRA.

    Raises:
        AdapterMismatchError: the magnitude vector does not have one value per output feature.
    """
    magnitude_key = shapes.module.magnitude_key
    assert magnitude_key is not None
    magnitude_shape = adapter.shape(magnitude_key)
    out_features = shapes.b_shape[0]
    # (out,) for Linear and Embedding; PEFT's convolutions keep the norm's
    # dimensions: (1, out, 1, ...).
    if sorted(magnitude_shape) != [1] * (len(magnitude_shape) - 1) + [out_features]:
        raise AdapterMismatchError(
            f"adapter key {magnitude_key!r} has shape {magnitude_shape} but the module "
            f"has {out_features} output features: the DoRA magnitude vector does not fit"
        )
    return replace(product, layer=f"{DORA_PREFIX}{product.layer}", magnitude_key=magnitude_key)


def norm_per_column(delta: LoraProduct) -> bool:
    """DoRA's norm spans every row of the stored weight, so it needs a first pass."""
    return delta.magnitude_key is not None and delta.transposed


def read_magnitude(delta: LoraProduct, adapter: TensorSource) -> torch.Tensor:
    """m as a vector, one value per output feature (a convolution's (1, out, 1, ...) flattened)."""
    assert delta.magnitude_key is not None
    return adapter.read_rows(delta.magnitude_key).reshape(-1)


def dora_scale_rows(values: torch.Tensor, magnitude_rows: torch.Tensor) -> torch.Tensor:
    """In place: each row of ``V`` times ``m / ||row||``; returns ``values``.

    DoRA with one output feature per stored row (Linear, convolutions). PEFT's
    ``DoraLinearVariant.merge_unsafe``: ``weight_norm = torch.linalg.norm(W + delta,
    dim=1)`` in the delta's float32, ``dora_factor = m / weight_norm``, then
    ``dora_factor.view(-1, 1) * (W + delta)``, rounded once. Same operations,
    same order, so 16-bit results are PEFT's.
    """
    import torch

    norms = torch.linalg.vector_norm(values, dim=1)
    return values.mul_((magnitude_rows.to(values.dtype) / norms).unsqueeze(1))


def column_sums_of_squares(values: torch.Tensor) -> torch.Tensor:
    """Per-column sums of squares of a tile of ``V``, in float64 (first pass of a column norm).

    DoRA on an embedding or a Conv1D weight normalises columns of the stored
    weight, and a column spans every row: the squares are summed tile by tile in
    float64, so the order of the tiles does not matter at the output's precision.
    """
    import torch

    return values.to(torch.float64).square_().sum(dim=0)


def dora_column_factor(magnitude: torch.Tensor, sums_of_squares: torch.Tensor) -> torch.Tensor:
    """``m / ||column||`` for every column, in float64, from :func:`column_sums_of_squares`.

    PEFT's ``DoraEmbeddingVariant`` (and the fan_in_fan_out Linear) take
    ``torch.linalg.norm(W.T + delta.T, dim=1)`` in float32; we take the same norm
    in float64 (see :func:`dora_scale_columns`).
    """
    import torch

    return magnitude.to(torch.float64) / sums_of_squares.sqrt()


def dora_scale_columns(values: torch.Tensor, column_factor: torch.Tensor) -> torch.Tensor:
    """Each column of a tile of ``V`` times its factor, in float64 (not yet rounded).

    PEFT computes ``dora_factor.view(1, -1) * (W + delta)`` in float32, rounding the
    norm, the factor and the product before the final rounding; the stream computes
    column DoRA in float64 throughout, so the one final rounding decides the result.
    """
    import torch

    return values.to(torch.float64).mul_(column_factor)
