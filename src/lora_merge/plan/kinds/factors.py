"""The one place a planned LoRA product's factors are read: for the stream and ``--verify`` alike.

Each layer kind knows how its adapter tensors become the 2-D A (r, in) and B
(out, r) whose product ``scale * B @ A`` is the delta in PEFT's (out, in)
layout (the stored weight is its transpose when the product is ``transposed``);
:func:`read_lora_factors` asks the product's kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_merge.io.reader import TensorSource
from lora_merge.plan.kinds import (
    conv1d,
    convolution,
    embedding,
    experts,
    linear,
    merged_linear,
)
from lora_merge.plan.model import LoraProduct

FactorReader = Callable[[LoraProduct, TensorSource], tuple[torch.Tensor, torch.Tensor]]

# layer kind -> how its factors are read (DoRA modules are read as their layer's).
_READERS: dict[str, FactorReader] = {
    linear.LAYER: linear.read_factors,
    conv1d.LAYER: conv1d.read_factors,
    embedding.LAYER: embedding.read_factors,
    convolution.LAYER: convolution.read_factors,
    merged_linear.LAYER: merged_linear.read_factors,
    experts.LAYER: experts.read_factors,
}


def read_lora_factors(
    delta: LoraProduct, adapter: TensorSource
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (r, in) and B (out, r), 2-D, in the adapter's dtype, with ``delta = scale * B @ A``.

    A product kept whole (``dense``: a combination of adapters at full rank, see
    :mod:`lora_merge.adapter.combined`) is A alone, the whole (out, in) delta, and no B.
    A fused expert weight's A and B are every expert's: take expert e's with
    :func:`lora_merge.plan.kinds.experts.expert_lora_factors`.
    """
    if delta.dense:  # A is the whole delta; there is no B
        return adapter.read_rows(delta.a_key), None
    return _READERS[delta.kind](delta, adapter)
