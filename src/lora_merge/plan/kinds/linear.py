"""``nn.Linear``: ``W (out, in) += scale * B @ A``.

Reproduces PEFT's ``Linear.get_delta_weight`` (``peft/tuners/lora/layer.py``)
with ``fan_in_fan_out=False``: ``transpose(B @ A, False) * scaling``, added to
the weight in ``Linear.merge``, and loralib's ``Linear`` (``W += B @ A * alpha / r``).

Shape rule: A is (r, in), B (out, r), and the weight (out, in). A weight shaped
(in, out) is transformers' Conv1D instead, and a square weight is told apart by
the architecture (see :func:`lora_merge.plan.kinds.conv1d.stores_transposed`,
which decides between the two).

Formula: A and B as stored. Row i of the delta is ``scale * B[i] @ A``, which
:func:`lora_merge.compute.lora.merged_rows` adds to row i of W.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_merge.io.reader import TensorSource
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import LoraProduct

# torch names types only: a plan, made before torch is imported, needs none of it
# (issue 24); the tensors come from the adapter's reader.
if TYPE_CHECKING:
    import torch

LAYER = "linear"


def plan_linear(shapes: LoraShapes, scale: float) -> LoraProduct:
    """The product for a weight stored (out, in) (the caller has matched its shape)."""
    return shapes.product(scale, transposed=False, layer=LAYER)


def read_factors(delta: LoraProduct, adapter: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r), as stored."""
    return adapter.read_rows(delta.a_key), adapter.read_rows(delta.b_key)
