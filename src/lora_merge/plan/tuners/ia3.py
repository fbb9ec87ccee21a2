"""IA3: every output (or, for ``feedforward_modules``, every input) of a layer scaled by ``l``.

Reproduces PEFT's ``IA3Layer``: ``Linear.merge`` (``peft/tuners/ia3/layer.py``)
computes ``torch.mul(W, transpose(l, fan_in_fan_out)).to(W.dtype)`` and, for a
layer that is not feedforward, ``torch.mul(bias, l.reshape(bias.shape))``;
``_ConvNd.merge`` multiplies by ``l.transpose(0, 1)`` (outputs) or ``l`` (inputs).
``unmerge`` divides by ``l + 1e-8`` instead, which inverts the merge up to rounding.

Shape rule (:func:`plan_ia3`): ``l`` is (out, 1), or (1, in) for a feedforward
module, on ``nn.Linear`` and transformers' Conv1D (whose weight is stored (in, out));
(1, out, 1, ...), or (1, in, 1, ...), on a convolution.

Formula: one product (or quotient) per element. W (16-bit or float32) times ``l``
(float32) is computed in float32, as PEFT computes it, and rounded once to the
output dtype: the result is PEFT's bit for bit, for every output dtype but float64.
Per stored row the factor is one number (outputs of a Linear, inputs of a Conv1D)
or a vector as long as the row (:func:`ia3_factor`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import TunerModuleKeys
from lora_merge.io.reader import TensorSource
from lora_merge.plan.architectures import is_conv1d_module
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.names import shape_mismatch

# torch is imported by the functions that compute values: a plan, made before
# torch is imported, needs none of it (issue 24).
if TYPE_CHECKING:
    import torch

TUNER = "ia3"
FORMULA = "IA3 modules: W * l per output row (per input column for feedforward modules)"
# PEFT's unmerge adds this to l before dividing, to avoid a division by zero.
UNMERGE_EPSILON = 1e-8


def plan_ia3(
    module: TunerModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
    model_type: object,
) -> TunerUpdate:
    """The update of one IA3 module's weight (its bias's is :func:`bias_update`).

    Raises:
        AdapterMismatchError: ``l`` does not fit the weight.
    """
    key = module.tensors["ia3_l"]
    shape = adapter.shape(key)
    feedforward = config.is_feedforward(module.module)
    if len(weight_shape) > 2:
        layer = "convolution"
        channels = weight_shape[1] if feedforward else weight_shape[0]
        expected: tuple[int, ...] = (1, channels, *([1] * (len(weight_shape) - 2)))
    else:
        layer = _linear_or_conv1d(module.module, shape, weight_shape, config, model_type)
        out_features, in_features = weight_shape[:: -1 if layer == "conv1d" else 1]
        expected = (1, in_features) if feedforward else (out_features, 1)
    if tuple(shape) != expected:
        raise shape_mismatch(key, shape, weight_key, weight_shape)
    return TunerUpdate(TUNER, module.module, (("ia3_l", key),), 1.0, layer, feedforward)


def _linear_or_conv1d(
    name: str,
    shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    config: LoraAdapterConfig,
    model_type: object,
) -> str:
    """Whether a 2-D weight is stored (out, in) (Linear) or (in, out) (Conv1D).

    The vector's shape tells the two apart unless the weight is square; then the
    architecture table decides, or the adapter's ``fan_in_fan_out``.
    """
    if weight_shape[0] != weight_shape[1]:
        # (out, 1) or (1, in): its long side is the weight's side of that name.
        fits_linear = shape[0] == weight_shape[0] or shape[-1] == weight_shape[1]
        return "linear" if fits_linear else "conv1d"
    known = is_conv1d_module(model_type if isinstance(model_type, str) else None, name)
    transposed = config.fan_in_fan_out if known is None else known
    return "conv1d" if transposed else "linear"


def bias_update(update: TunerUpdate) -> TunerUpdate | None:
    """The bias's update: scaled with the outputs, untouched for a feedforward module."""
    return (
        None
        if update.feedforward
        else TunerUpdate(TUNER, update.module, update.keys, 1.0, "bias", False, update.unmerge)
    )


def ia3_factor(
    update: TunerUpdate, vector: torch.Tensor, row_elements: int, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """``l`` laid out against the stored weight viewed as (rows, row_elements).

    Returns:
        The factor in the compute dtype (``l + 1e-8`` for ``--unmerge``, as PEFT's
        unmerge), and whether it is one number per row (True) or one per column.
    """
    factor = vector.to(compute_dtype).reshape(-1)
    if update.unmerge:
        factor = factor + UNMERGE_EPSILON
    per_row = (update.layer != "conv1d") != update.feedforward
    if update.layer == "bias":
        per_row = True
    elif not per_row and factor.numel() != row_elements:  # a convolution's inputs: k values each
        factor = factor.repeat_interleave(row_elements // factor.numel())
    return factor, per_row


def scaled_rows(
    base_rows: torch.Tensor, factor: torch.Tensor, per_row: bool, start: int, divide: bool
) -> torch.Tensor:
    """Rows ``start:`` of ``W ⊙ l`` (or ``W / l``) in the factor's dtype, not yet rounded."""
    import torch

    rows = base_rows.to(factor.dtype)
    if per_row:
        factor = factor[start : start + base_rows.shape[0]].unsqueeze(1)
    return torch.div(rows, factor) if divide else torch.mul(rows, factor)


def compute_dtype_for_ia3(output_dtype: torch.dtype) -> torch.dtype:
    """float32, as PEFT (a product rounded once in float32 is correctly rounded to it)."""
    import torch

    return torch.float64 if output_dtype.itemsize > 4 else torch.float32


def vector_elements(update: TunerUpdate, adapter: TensorSource) -> int:
    """How many values ``l`` holds (for the memory estimate)."""
    return math.prod(adapter.shape(update.keys[0][1]))
