"""LoKr (low-rank Kronecker product): ``W + kron(W1, W2)·alpha/r``.

Reproduces PEFT's ``LoKrLayer.get_delta_weight`` (``peft/tuners/lokr/layer.py``),
added to the weight by ``LycorisLayer.merge`` (``weight.data += get_delta_weight``):
``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2 = lokr_w2``,
``make_weight_cp(lokr_t2, lokr_w2_a, lokr_w2_b)`` (the CP form,
``einsum("i j k l, i p, j r -> p r k l", t, wa, wb)``) or ``lokr_w2_a @ lokr_w2_b``;
then ``make_kron(w1, w2, scale)``: ``torch.kron(w1, w2) * scale`` (w1 given two
unit dimensions when w2 is 4-D), reshaped to the weight's shape; ``scale = alpha / r``
from ``alpha_pattern``/``rank_pattern``.

Shape rule (:func:`plan_lokr`): the Kronecker product has as many elements as
the weight (PEFT adapts ``nn.Linear`` and ``nn.Conv1d/2d`` only).

Formula (:func:`lokr_delta`): PEFT's operations in PEFT's order, in the compute
dtype (float32 for 16-bit outputs: PEFT's bits), built once per weight.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import TunerModuleKeys
from lora_merge.errors import InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.names import shape_mismatch

# torch is imported by the functions that compute values: a plan, made before
# torch is imported, needs none of it (issue 24).
if TYPE_CHECKING:
    import torch

TUNER = "lokr"
FORMULA = "LoKr modules: W + kron(W1, W2) * alpha / r"


def plan_lokr(
    module: TunerModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
) -> TunerUpdate:
    """The update of one LoKr module.

    Raises:
        InvalidInputError: W1 or W2 is neither whole nor a complete factorisation.
        AdapterMismatchError: the product does not fit the weight.
    """
    tensors = module.tensors
    w1 = _factor_shape(module, "lokr_w1", ("lokr_w1_a", "lokr_w1_b"), adapter)
    w2_roles = ("lokr_w2_a", "lokr_w2_b", "lokr_t2") if "lokr_t2" in tensors else None
    w2 = _factor_shape(module, "lokr_w2", w2_roles or ("lokr_w2_a", "lokr_w2_b"), adapter)
    if len(weight_shape) < 2 or math.prod(w1) * math.prod(w2) != math.prod(weight_shape):
        first_key = next(iter(tensors.values()))
        raise shape_mismatch(first_key, adapter.shape(first_key), weight_key, weight_shape)
    layer = "convolution" if len(weight_shape) > 2 else "linear"
    scale = config.scale_for(module.module, config.rank_for(module.module))
    keys = tuple(sorted(tensors.items()))
    return TunerUpdate(TUNER, module.module, keys, scale, layer)


def _factor_shape(
    module: TunerModuleKeys, whole: str, parts: tuple[str, ...], adapter: TensorSource
) -> tuple[int, ...]:
    """The shape of W1 or W2: the whole tensor's, or its factors' product's."""
    tensors = module.tensors
    if whole in tensors:
        return tuple(adapter.shape(tensors[whole]))
    missing = [role for role in parts if role not in tensors]
    if missing:
        raise InvalidInputError(
            f"LoKr module {module.module!r} has neither {whole} nor {', '.join(missing)}: "
            "the adapter file is incomplete"
        )
    shapes = [tuple(adapter.shape(tensors[role])) for role in parts]
    if len(parts) == 3:  # CP: t (r, r, k, k'), wa (r, b), wb (r, d) -> (b, d, k, k')
        return (shapes[0][-1], shapes[1][-1], *shapes[2][2:])
    return (shapes[0][0], shapes[1][-1])


def lokr_delta(
    tensors: dict[str, torch.Tensor], update: TunerUpdate, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """PEFT's LoKr delta (not yet reshaped to the weight), from tensors in the compute dtype."""
    import torch

    w1 = tensors.get("lokr_w1")
    if w1 is None:
        w1 = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors.get("lokr_w2")
    if w2 is None and "lokr_t2" in tensors:  # lokr's make_weight_cp
        w2 = torch.einsum(
            "i j k l, i p, j r -> p r k l",
            tensors["lokr_t2"],
            tensors["lokr_w2_a"],
            tensors["lokr_w2_b"],
        )
    elif w2 is None:
        w2 = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    if w2.dim() == 4:  # make_kron
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # PEFT's ``w2.contiguous()`` keeps the einsum's stride on a unit dimension (a Conv1d's CP
    # form, (b, d, k, 1)), on which torch.kron fails: PEFT can neither run nor merge such a
    # layer. Laying w2 out afresh changes no value of the (elementwise) Kronecker product.
    w2 = w2.reshape(-1).clone().view(w2.shape)
    return torch.kron(w1, w2) * update.scale
