"""The tensor names that mark a bitsandbytes checkpoint. Torch-free.

transformers saves a bitsandbytes base without a ``quantization_config`` in
some versions, so such a base is recognised by its tensor names alone, on every
base: here, before ``import torch``, so that an ordinary base is told apart
without loading the format (:mod:`lora_merge.io.formats.bitsandbytes`, which
reads the groups these names mark).
"""

from __future__ import annotations

from collections.abc import Iterable

# A 4-bit weight's quant state: ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``).
QUANT_STATE_MARKER = ".quant_state.bitsandbytes__"
# An 8-bit (LLM.int8) weight's scale per row: ``X.SCB``.
INT8_SCALE_SUFFIX = ".SCB"


def is_four_bit_state(name: str) -> bool:
    """Whether ``name`` is a 4-bit weight's quant state."""
    return QUANT_STATE_MARKER in name


def is_int8_scale(name: str) -> bool:
    """Whether ``name`` is an 8-bit weight's scales."""
    return name.endswith(INT8_SCALE_SUFFIX)


def names_bitsandbytes_weights(names: Iterable[str]) -> bool:
    """Whether any of a checkpoint's tensor names marks a bitsandbytes weight."""
    return any(is_four_bit_state(name) or is_int8_scale(name) for name in names)
