"""transformers' ``Conv1D`` (GPT-2 and its family): the weight is stored (in, out).

Reproduces PEFT's ``Linear.get_delta_weight`` (``peft/tuners/lora/layer.py``)
with ``fan_in_fan_out=True``, which PEFT sets for Conv1D modules:
``transpose(B @ A, True) * scaling``, i.e. ``W (in, out) += scale * (B @ A).T``;
and loralib's ``Linear`` with ``fan_in_fan_out``.

Shape rule (:func:`stores_transposed`): A is (r, in) and B (out, r); a weight
(out, in) is an ``nn.Linear``, a weight (in, out) a Conv1D. A square weight
(GPT-2's attention ``c_proj``) cannot be told by its shape: the architecture
table :data:`lora_merge.plan.architectures.CONV1D_MODULES_BY_MODEL_TYPE` decides,
or, for an architecture it does not know, the adapter's ``fan_in_fan_out``.

Formula: the same A and B as a Linear; only the layout differs. Stored row j
(input feature j) of the delta is ``scale * B @ A[:, j]``, which
:func:`lora_merge.compute.lora.merged_rows` computes for ``transposed`` products.
"""

from __future__ import annotations

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.plan.architectures import is_conv1d_module
from lora_merge.plan.kinds.linear import read_factors
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import LoraProduct

LAYER = "conv1d"

__all__ = ["LAYER", "plan_conv1d", "read_factors", "stores_transposed"]


def stores_transposed(shapes: LoraShapes, config: LoraAdapterConfig, model_type: object) -> bool:
    """Whether a 2-D weight is a Conv1D's (in, out) (True) or a Linear's (out, in) (False).

    Raises:
        AdapterMismatchError: the weight is neither.
    """
    weight_shape = shapes.weight_shape
    if len(weight_shape) != 2:
        raise shapes.mismatch()
    out_features, in_features = shapes.b_shape[0], shapes.a_shape[1]
    if in_features == out_features:
        if weight_shape != (out_features, in_features):
            raise shapes.mismatch()
        name = shapes.module.module
        known = is_conv1d_module(model_type if isinstance(model_type, str) else None, name)
        return config.fan_in_fan_out if known is None else known
    if weight_shape == (out_features, in_features):
        return False  # nn.Linear stores (out, in)
    if weight_shape == (in_features, out_features):
        return True  # transformers' Conv1D stores (in, out)
    raise shapes.mismatch()


def plan_conv1d(shapes: LoraShapes, scale: float) -> LoraProduct:
    """The product for a weight stored (in, out) (see :func:`stores_transposed`)."""
    return shapes.product(scale, transposed=True, layer=LAYER)
