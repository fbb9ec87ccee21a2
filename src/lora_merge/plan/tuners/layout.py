"""How a 2-D weight stores a layer whose inputs and outputs are known: (out, in) or (in, out).

AdaLoRA and VeRA adapt ``nn.Linear`` and transformers' Conv1D (PEFT's
``fan_in_fan_out``); their factors say the layer's input and output sizes, and
the weight's shape which layout it is stored in, except for a square weight,
which the architecture table (or the adapter's ``fan_in_fan_out``) decides, as
for LoRA (:func:`lora_merge.plan.kinds.conv1d.stores_transposed`).
"""

from __future__ import annotations

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.plan.architectures import is_conv1d_module


def stored_layout(
    name: str,
    out_features: int,
    in_features: int,
    weight_shape: tuple[int, ...],
    config: LoraAdapterConfig,
    model_type: object,
) -> str | None:
    """``linear`` (stored (out, in)), ``conv1d`` (stored (in, out)), or None: it fits neither."""
    if weight_shape == (out_features, in_features) == (in_features, out_features):
        known = is_conv1d_module(model_type if isinstance(model_type, str) else None, name)
        return "conv1d" if (config.fan_in_fan_out if known is None else known) else "linear"
    if weight_shape == (out_features, in_features):
        return "linear"
    return "conv1d" if weight_shape == (in_features, out_features) else None
