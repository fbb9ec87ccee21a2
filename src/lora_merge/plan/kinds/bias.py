"""A LoRA bias (PEFT ``lora_bias=True``): ``bias += scale * lora_B.bias``.

Reproduces PEFT's ``Linear.merge`` (``peft/tuners/lora/layer.py``) for an
adapter with ``lora_bias``: ``base_layer.bias + lora_B.bias * scaling``, with the
module's own scale; computed in float32 (float64 for 32-bit outputs) and
rounded once (:func:`merge_lora_bias`).

Shape rule (:func:`plan_lora_bias`): ``lora_B.bias`` has one value per output
feature, the bias's shape. A layer the base built without a bias starts from
zeros, provided a config.json flag of the architecture gives it one
(:func:`bias_flag`); that flag then gives every layer of its group a bias, and
those the adapter does not train get zeros (:func:`add_flagged_biases`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import LoraModuleKeys
from lora_merge.dtypes import DType
from lora_merge.errors import AdapterMismatchError
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.plan.architectures import bias_flag_for
from lora_merge.plan.model import Delta, LoraBias, MergePlan, PlannedTensor
from lora_merge.plan.names import shape_mismatch

if TYPE_CHECKING:  # the plan is made before torch is imported; the merge imports it
    import torch


def bias_key_of(weight_key: str) -> str:
    """``X.weight`` -> ``X.bias``."""
    return weight_key.removesuffix("weight") + "bias"


def plan_lora_bias(
    module: LoraModuleKeys,
    bias_key: str,
    bias_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
) -> LoraBias:
    """``scale * lora_B.bias`` to add to the bias ``bias_key``.

    Raises:
        AdapterMismatchError: ``lora_B.bias`` does not have the bias's shape.
    """
    assert module.bias_key is not None
    if adapter.shape(module.bias_key) != bias_shape:
        raise shape_mismatch(module.bias_key, adapter.shape(module.bias_key), bias_key, bias_shape)
    rank = adapter.shape(module.a_key or "")[0]
    return LoraBias(module.bias_key, config.scale_for(module.module, rank))


def bias_flag(
    module: LoraModuleKeys,
    weight_key: str,
    model_type: object,
) -> str:
    """A LoRA bias for a layer the base built without one: the config flag that gives it one.

    PEFT cannot merge this (``lora_bias=True`` on a layer without a bias); the merge
    is simply ``0 + scale * b``, provided the architecture can hold the bias.

    Raises:
        AdapterMismatchError: no config flag of this architecture gives the layer a bias.
    """
    flag = bias_flag_for(model_type if isinstance(model_type, str) else None, module.module)
    if flag is None:
        raise AdapterMismatchError(
            f"adapter key {module.bias_key!r} adds a bias to {weight_key!r}, which has none, and "
            f"{model_type or 'this'} models have no config.json flag that gives that layer a "
            "bias, so the merged model could not load it; retrain with lora_bias=False"
        )
    return flag[0]


def add_flagged_biases(
    plan: MergePlan,
    flags: list[str],
    base: BaseCheckpoint,
    deltas: dict[str, Delta],
    output_dtype: DType | None,
) -> None:
    """Append biases the base lacks, and switch their config flags on.

    A flag such as Llama's ``attention_bias`` gives every module of its group, in
    every layer, a bias: those the adapter does not train get zeros, which is what
    the base computed without them.

    Args:
        plan: the plan, its base tensors planned.
        flags: the config flags the adapter's biases need, in the order first needed.
        base: the base checkpoint.
        deltas: base key -> what the adapter adds to it (the trained biases' deltas).
        output_dtype: dtype of every floating-point tensor, or None to keep each one's.
    """
    model_type = base.config.get("model_type")
    for flag in flags:
        plan.config_updates[flag] = True
    for name, entry in base.tensors.items():
        if not name.endswith(".weight") or len(entry.shape) != 2:
            continue
        bias_name = bias_key_of(name)
        module = name.removesuffix(".weight")
        found = bias_flag_for(model_type if isinstance(model_type, str) else None, module)
        if bias_name in base.tensors or found is None or found[0] not in flags:
            continue
        dtype = output_dtype if output_dtype is not None else entry.dtype
        plan.tensors.append(
            PlannedTensor(
                spec=TensorSpec(name=bias_name, dtype=dtype, shape=(entry.shape[0],)),
                source="zeros",
                source_key=bias_name,
                source_dtype=dtype,
                delta=deltas.get(bias_name),
            )
        )


def merge_lora_bias(
    base_bias: torch.Tensor, lora_bias: torch.Tensor, scale: float, output_dtype: torch.dtype
) -> torch.Tensor:
    """``bias + scale * lora_B.bias``, rounded once (PEFT ``lora_bias=True``)."""
    from lora_merge.compute.lora import compute_dtype_for  # imports torch

    compute_dtype = compute_dtype_for(output_dtype)
    delta = lora_bias.to(compute_dtype).mul(scale)
    return delta.add_(base_bias).to(output_dtype)
