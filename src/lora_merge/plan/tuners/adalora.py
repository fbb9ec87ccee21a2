"""AdaLoRA: ``W + B·(A⊙E)·alpha/ranknum``, SVD-shaped LoRA whose ranks were pruned in training.

Reproduces PEFT's ``SVDLinear.get_delta_weight`` (``peft/tuners/adalora/layer.py``):
``transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5)``, added
to the weight by ``SVDLinear.merge`` (``weight.data += get_delta_weight``), with
``scaling = lora_alpha`` (or the layer's rank when ``lora_alpha`` is 0) and
``ranknum`` the float32 initial rank ``init_r``: PEFT's
``resize_modules_by_rank_pattern`` keeps ``ranknum`` when it prunes a layer to the
ranks ``rank_pattern``'s boolean mask keeps, and the saved A, B and E hold only
those (a layer pruned to nothing: an empty product, a zero delta).

Shape rule (:func:`plan_adalora`): A (r, in), E (r, 1), B (out, r), r the count of
``True`` in the module's mask when ``rank_pattern`` names it; the weight (out, in)
(``nn.Linear``) or (in, out) (transformers' Conv1D, ``fan_in_fan_out``).

Formula (:func:`adalora_delta`): PEFT's operations in PEFT's order, in the compute
dtype (float32 for 16-bit outputs: PEFT's bits), once per weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig, pattern_key_for
from lora_merge.adapter.keys import TunerModuleKeys
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.names import shape_mismatch
from lora_merge.plan.tuners.layout import stored_layout

# torch is imported by the functions that compute values: a plan, made before
# torch is imported, needs none of it (issue 24).
if TYPE_CHECKING:
    import torch

TUNER = "adalora"
FORMULA = "AdaLoRA modules: W + B @ (A * E) * alpha / (init_r + 1e-5)"
# PEFT's get_delta_weight adds it to ranknum before dividing.
RANKNUM_EPSILON = 1e-5
_ROLES = ("lora_A", "lora_B", "lora_E")


def plan_adalora(
    module: TunerModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
    model_type: object,
) -> TunerUpdate:
    """The update of one AdaLoRA module.

    Raises:
        InvalidInputError: A, B or E is missing.
        AdapterMismatchError: the factors do not fit each other, the weight, or the
            module's ``rank_pattern`` mask.
    """
    missing = [role for role in _ROLES if role not in module.tensors]
    if missing:
        raise InvalidInputError(
            f"AdaLoRA module {module.module!r} lacks {', '.join(missing)}: the adapter file is "
            "incomplete"
        )
    keys = {role: module.tensors[role] for role in _ROLES}
    a_shape, b_shape, e_shape = (tuple(adapter.shape(keys[role])) for role in _ROLES)
    rank = a_shape[0]
    if len(a_shape) != 2 or b_shape != (b_shape[0], rank) or e_shape != (rank, 1):
        raise AdapterMismatchError(
            f"AdaLoRA module {module.module!r}: A {a_shape}, B {b_shape} and E {e_shape} do not "
            "share one rank; the adapter file is inconsistent"
        )
    pattern = pattern_key_for(config.rank_pattern, module.module)
    if pattern is not None and config.rank_pattern[pattern] != rank:
        raise AdapterMismatchError(
            f"AdaLoRA module {module.module!r} keeps {config.rank_pattern[pattern]} ranks by its "
            f"rank_pattern mask, but its A has {rank} rows; the config and the file disagree"
        )
    layer = stored_layout(module.module, b_shape[0], a_shape[1], weight_shape, config, model_type)
    if layer is None:
        raise shape_mismatch(keys["lora_A"], a_shape, weight_key, weight_shape)
    scale = config.lora_alpha if config.lora_alpha > 0 else float(rank)
    ordered = tuple((role, keys[role]) for role in _ROLES)
    return TunerUpdate(TUNER, module.module, ordered, scale, layer, ranknum=config.init_r)


def adalora_delta(
    tensors: dict[str, torch.Tensor], update: TunerUpdate, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """PEFT's AdaLoRA delta in the stored layout, from tensors in the compute dtype."""
    import torch

    product = tensors["lora_B"] @ (tensors["lora_A"] * tensors["lora_E"])
    if update.layer == "conv1d":  # transpose(..., fan_in_fan_out)
        product = product.T
    # ranknum is a float32 parameter (float64 for 32-bit outputs, as PEFT's float64 model).
    ranknum = torch.full((1,), float(update.ranknum), dtype=product.dtype, device=product.device)
    return product * update.scale / (ranknum + RANKNUM_EPSILON)
