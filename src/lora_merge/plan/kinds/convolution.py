"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: each output channel is one flat row.

Reproduces PEFT's ``_ConvNd.get_delta_weight`` (``peft/tuners/lora/layer.py``,
the ``Conv1d``/``Conv2d``/``Conv3d`` layers) for ``groups = 1``. There A is a
convolution (r, in, *kernel) and B a 1x...x1 convolution (out, r, 1, ...), and
the delta ``conv(A.transpose(0, 1), B).transpose(0, 1) * scaling`` (or, for a
1x1 kernel, ``(B @ A)`` with the unit dimensions squeezed) is, element for
element, ``scale * B.view(out, r) @ A.view(r, -1)`` viewed as the weight
(out, in, *kernel).

Shape rule (:func:`check_convolution`): the weight is (out, in, *kernel) with
out B's rows, in A's input channels and the same kernel as A; B's kernel is all
ones. A grouped convolution (weight (out, in / groups, *kernel)) is refused by
name: PEFT trains a LoRA on it with a full-width A, and its merge for
``groups > 1`` is another formula, which lora-merge does not reproduce.

Formula (:func:`read_factors`): A and B flattened to (r, in·kernel) and (out, r);
each output channel is then one row of the weight viewed as (out, -1), merged as
a Linear's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_merge.errors import InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import LoraProduct

# torch names types only: a plan, made before torch is imported, needs none of it
# (issue 24); the tensors come from the adapter's reader.
if TYPE_CHECKING:
    import torch

LAYER = "convolution"


def check_convolution(shapes: LoraShapes) -> None:
    """A (r, in, *kernel) and B (out, r, 1, ...) fit a weight (out, in / groups, *kernel).

    Raises:
        InvalidInputError: the weight is a grouped convolution (groups > 1).
        AdapterMismatchError: the shapes do not fit.
    """
    a_shape, b_shape, weight_shape = shapes.a_shape, shapes.b_shape, shapes.weight_shape
    if len(weight_shape) != len(a_shape) or weight_shape[0] != b_shape[0]:
        raise shapes.mismatch()
    in_channels, per_group = a_shape[1], weight_shape[1]
    if in_channels != per_group:
        if per_group and in_channels % per_group == 0:
            raise InvalidInputError(
                f"adapter module {shapes.module.module!r} adapts a grouped convolution (groups = "
                f"{in_channels // per_group}, weight {shapes.weight_key!r} is {weight_shape}); "
                "lora-merge merges LoRA into convolutions with groups = 1 only"
            )
        raise shapes.mismatch()
    if a_shape[2:] != weight_shape[2:] or any(size != 1 for size in b_shape[2:]):
        raise shapes.mismatch()


def plan_convolution(shapes: LoraShapes, scale: float) -> LoraProduct:
    """The product for a convolution (its shapes checked by :func:`check_convolution`)."""
    return shapes.product(scale, transposed=False, layer=LAYER)


def read_factors(delta: LoraProduct, adapter: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
    """A as (r, in·kernel) and B as (out, r): PEFT's ``B.view(-1, r) @ A.view(r, -1)``."""
    lora_a = adapter.read_rows(delta.a_key)
    rank = lora_a.shape[0]
    return lora_a.reshape(rank, -1), adapter.read_rows(delta.b_key).reshape(-1, rank)
