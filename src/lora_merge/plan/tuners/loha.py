"""LoHa (low-rank Hadamard product): ``W + (W1a·W1b) ⊙ (W2a·W2b)·alpha/r``.

Reproduces PEFT's ``LoHaLayer.get_delta_weight`` (``peft/tuners/loha/layer.py``),
added to the weight by ``LycorisLayer.merge`` (``peft/tuners/lycoris_utils.py``:
``weight.data += get_delta_weight``):

- ``HadaWeight.forward``: ``((w1a @ w1b) * (w2a @ w2b)) * scale``, then reshaped
  to the weight's shape: ``nn.Linear`` (out, in), and a convolution flattened to
  (out, in·kernel) when ``use_effective_conv2d`` is off;
- ``HadaWeightCP.forward`` (``use_effective_conv2d``, the CP/Tucker form for
  convolutions): ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`` for each
  half, then ``rebuild1 * rebuild2 * scale``;

with ``scale = alpha / r`` from ``alpha_pattern``/``rank_pattern`` (``_create_and_replace``).

Shape rule (:func:`plan_loha`): the delta has as many elements as the weight, and
its leading dimension is the weight's outputs; PEFT adapts ``nn.Linear`` and
``nn.Conv1d/2d`` only (not transformers' Conv1D).

Formula (:func:`loha_delta`): PEFT's operations in PEFT's order, in the compute
dtype (float32 for 16-bit outputs, so the result is PEFT's bit for bit; float64
for 32-bit ones), built once per weight and added row tile by row tile.
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

TUNER = "loha"
FORMULA = "LoHa modules: W + (W1a @ W1b) * (W2a @ W2b) * alpha / r"
_PLAIN = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_CP = ("hada_t1", "hada_t2")


def plan_loha(
    module: TunerModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
) -> TunerUpdate:
    """The update of one LoHa module.

    Raises:
        InvalidInputError: a tensor of the module is missing.
        AdapterMismatchError: the delta does not fit the weight.
    """
    tensors = module.tensors
    is_cp = any(role in tensors for role in _CP)
    roles = _PLAIN + (_CP if is_cp else ())
    missing = [role for role in roles if role not in tensors]
    if missing:
        raise InvalidInputError(
            f"LoHa module {module.module!r} lacks {', '.join(missing)}: the adapter file is "
            "incomplete"
        )
    shapes = {role: tuple(adapter.shape(tensors[role])) for role in roles}
    w1a, w1b = shapes["hada_w1_a"], shapes["hada_w1_b"]
    if is_cp:  # t (r, r, k, k'), w_a (r, out), w_b (r, in): (out, in, k, k')
        t1 = shapes["hada_t1"]
        delta_shape: tuple[int, ...] = (w1a[-1], w1b[-1], *t1[2:])
    else:  # w_a (out, r), w_b (r, in·kernel)
        delta_shape = (w1a[0], w1b[-1])
    fits = (
        len(weight_shape) >= 2
        and delta_shape[0] == weight_shape[0]
        and math.prod(delta_shape) == math.prod(weight_shape)
        and all(shapes[f"hada_w2_{s}"] == shapes[f"hada_w1_{s}"] for s in "ab")
        and (not is_cp or shapes["hada_t2"] == shapes["hada_t1"])
    )
    if not fits:
        raise shape_mismatch(tensors["hada_w1_a"], w1a, weight_key, weight_shape)
    layer = "convolution" if len(weight_shape) > 2 else "linear"
    scale = config.scale_for(module.module, config.rank_for(module.module))
    keys = tuple((role, tensors[role]) for role in roles)
    return TunerUpdate(TUNER, module.module, keys, scale, layer)


def loha_delta(
    tensors: dict[str, torch.Tensor], update: TunerUpdate, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """PEFT's LoHa delta (not yet reshaped to the weight), from tensors in the compute dtype."""
    import torch

    scale = update.scale
    if "hada_t1" in tensors:  # HadaWeightCP.forward
        rebuild1 = torch.einsum(
            "i j k l, j r, i p -> p r k l",
            tensors["hada_t1"],
            tensors["hada_w1_b"],
            tensors["hada_w1_a"],
        )
        rebuild2 = torch.einsum(
            "i j k l, j r, i p -> p r k l",
            tensors["hada_t2"],
            tensors["hada_w2_b"],
            tensors["hada_w2_a"],
        )
        return rebuild1 * rebuild2 * _scale_tensor(scale, rebuild1.dtype)
    # HadaWeight.forward
    product1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
    product2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
    return (product1 * product2) * _scale_tensor(scale, product1.dtype)


def _scale_tensor(scale: float, dtype: torch.dtype) -> torch.Tensor:
    """PEFT passes ``scale=torch.tensor(self.scaling)``: a float32 scalar (in float64 here
    for 32-bit outputs, which are computed in float64)."""
    import torch

    return torch.tensor(scale, dtype=torch.float32).to(dtype)
