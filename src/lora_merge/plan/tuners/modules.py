"""Plan every module of an AdaLoRA, IA3, LoHa, LoKr or OFT adapter: one update per tensor it changes.

The adapter's ``peft_type`` says which type it is; each module's tensors
(:class:`~lora_merge.adapter.keys.TunerModuleKeys`) must be that type's, and its
weight is located as a LoRA module's is. The type's own module checks the
shapes and decides the update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents
from lora_merge.dtypes import DType
from lora_merge.errors import InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.names import BaseNames
from lora_merge.plan.tuners import adalora, ia3, loha, lokr, oft, vera

# peft_type -> the role prefix of its tensors.
_ROLE_PREFIX = {
    "ADALORA": "lora_",
    "IA3": "ia3_",
    "LOHA": "hada_",
    "LOKR": "lokr_",
    "OFT": "oft_",
    "VERA": "vera_",
}
# Types that multiply the weight: --unmerge divides; the others subtract (negated scale).
_MULTIPLIERS = (ia3.TUNER, oft.TUNER)


def plan_tuner_modules(
    contents: AdapterContents,
    base_names: BaseNames,
    weight_shape: Callable[[str], tuple[int, ...]],
    has_tensor: Callable[[str], bool],
    adapter: TensorSource,
    config: LoraAdapterConfig,
    model_type: object,
    unmerge: bool,
    stored_dtype: Callable[[str], DType | None] = lambda key: None,
) -> dict[str, TunerUpdate]:
    """Base tensor name -> its update, for every module of a non-LoRA adapter.

    Args:
        contents: the adapter's keys, sorted by role.
        base_names: the base's tensor names, to locate each module's weight.
        weight_shape: a base tensor's shape, as planned.
        stored_dtype: a base weight's floating-point dtype as stored, None when quantized.
        has_tensor: whether the base holds a tensor (a layer's bias).
        adapter: the adapter's tensors (shapes only are read).
        config: the adapter's config (its ``peft_type`` says the type).
        model_type: config.json's ``model_type`` (tells Conv1D from Linear).
        unmerge: undo the updates: IA3 divides, LoHa and LoKr subtract (the scale
            is negated, which is exact).

    Raises:
        InvalidInputError: tensors of another type, or LoRA's, in the file.
        AdapterMismatchError: a module does not fit its weight.
    """
    _refuse_mixed_contents(contents, config)
    if config.peft_type == "LORA":
        return {}
    updates: dict[str, TunerUpdate] = {}
    weights = {
        name: base_names.locate(f"{name}.weight", next(iter(module.tensors.values())))
        for name, module in contents.tuner_modules.items()
    }
    for module in contents.tuner_modules.values():
        weight_key = weights[module.module]
        shape = weight_shape(weight_key)
        if config.peft_type == "VERA":
            update = vera.plan_vera(
                module, weight_key, shape, adapter, contents, config, model_type
            )
            if not contents.shared_tuner_tensors:  # save_projection=False: PEFT regenerates them
                sizes = _vera_sizes(contents, adapter, weights, weight_shape)
                projections = (config.projection_prng_key, *sizes)
                update = dataclasses.replace(
                    update, projections=projections, projection_dtype=stored_dtype(weight_key)
                )
        elif config.peft_type == "IA3":
            update = ia3.plan_ia3(module, weight_key, shape, adapter, config, model_type)
        elif config.peft_type == "ADALORA":
            update = adalora.plan_adalora(module, weight_key, shape, adapter, config, model_type)
        elif config.peft_type == "OFT":
            update = oft.plan_oft(module, weight_key, shape, adapter, config)
        elif config.peft_type == "LOHA":
            update = loha.plan_loha(module, weight_key, shape, adapter, config)
        else:
            update = lokr.plan_lokr(module, weight_key, shape, adapter, config)
        if unmerge:
            scale = update.scale if update.tuner in _MULTIPLIERS else -update.scale
            update = dataclasses.replace(update, scale=scale, unmerge=True)
        updates[weight_key] = update
        bias_key = weight_key.removesuffix("weight") + "bias"
        bias = ia3.bias_update(update) if update.tuner == ia3.TUNER else None
        if bias is not None and has_tensor(bias_key):
            updates[bias_key] = bias
    return updates


def _vera_sizes(
    contents: AdapterContents,
    adapter: TensorSource,
    weights: dict[str, str],
    weight_shape: Callable[[str], tuple[int, ...]],
) -> tuple[int, int, int]:
    """VeRA's shared A's and B's sizes, from every module's layer (see ``projection_sizes``)."""
    in_features = {}
    for name, module in contents.tuner_modules.items():
        out_features = adapter.shape(module.tensors["vera_lambda_b"])[0]
        in_features[name] = math.prod(weight_shape(weights[name])) // out_features
    return vera.projection_sizes(contents, adapter, in_features)


def _refuse_mixed_contents(contents: AdapterContents, config: LoraAdapterConfig) -> None:
    """An IA3/LoHa/LoKr file holds that type's tensors only (modules_to_save aside)."""
    if config.peft_type == "LORA":
        module = next(iter(contents.tuner_modules.values()), None)
        if module is not None:
            raise InvalidInputError(
                f"adapter key {next(iter(module.tensors.values()))!r} belongs to an IA3, LoHa "
                "or LoKr adapter, but adapter_config.json says the adapter is LoRA: the file "
                "and the config do not belong together"
            )
        return
    prefix = _ROLE_PREFIX[config.peft_type]
    for module in contents.tuner_modules.values():
        for role, key in module.tensors.items():
            if not role.startswith(prefix):
                raise InvalidInputError(
                    f"adapter key {key!r} is not a tensor of a {config.peft_type} adapter, "
                    "which its adapter_config.json says this is: the file and the config "
                    "do not belong together"
                )
    if contents.lora_modules or contents.trainable_tokens:
        name = next(iter(contents.lora_modules), None) or next(iter(contents.trainable_tokens))
        raise InvalidInputError(
            f"adapter module {name!r} holds LoRA tensors, but adapter_config.json says the "
            f"adapter is {config.peft_type}: the file and the config do not belong together"
        )
