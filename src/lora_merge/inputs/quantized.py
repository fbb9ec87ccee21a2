"""Recognise a bitsandbytes-quantized base from its headers and config.json.

Which stored tensors make one quantized weight is the checkpoint format's
business (:mod:`lora_merge.io.bitsandbytes_format`); this module decides what a
base made of them is: bitsandbytes or another method (refused), 4-bit or 8-bit,
and the dtype a merge of it writes by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lora_merge.errors import InvalidInputError
from lora_merge.io.bitsandbytes_format import (
    QUANT_STATE_DTYPES,
    FourBitWeight,
    QuantizedWeight,
    quantized_weights,
)

# Re-exported while plan/requantize.py imports it from here; its home is io/bitsandbytes_format.
from lora_merge.io.bitsandbytes_format import LogicalTensor as LogicalTensor
from lora_merge.io.safetensors_format import TensorEntry


@dataclass(frozen=True)
class BitsAndBytesBase:
    """What a bitsandbytes base adds to its stored tensors.

    Attributes:
        weights: logical weight name -> its quantized pieces.
        config: config.json's ``quantization_config`` (empty when the base has none).
    """

    weights: dict[str, QuantizedWeight]
    config: dict[str, object]

    @property
    def is_4bit(self) -> bool:
        return any(isinstance(w, FourBitWeight) for w in self.weights.values())

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """``bnb_4bit_compute_dtype`` from the config, else the quant states' dtype (4-bit only)."""
        if not self.is_4bit:
            return None
        name = self.config.get("bnb_4bit_compute_dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in QUANT_STATE_DTYPES:
            return QUANT_STATE_DTYPES[name.removeprefix("torch.")]
        return next(w.dtype for w in self.weights.values() if isinstance(w, FourBitWeight))

    def describe(self) -> str:
        """e.g. ``bitsandbytes nf4 (double quant, blocksize 64)`` or ``bitsandbytes int8``."""
        four_bit = [w for w in self.weights.values() if isinstance(w, FourBitWeight)]
        if not four_bit:
            return "bitsandbytes int8"
        first = four_bit[0]
        double = ", double quant" if first.nested is not None else ""
        return f"bitsandbytes {first.quant_type} (blocksize {first.blocksize}{double})"


def read_bitsandbytes_base(
    entries: Mapping[str, TensorEntry], config: Mapping[str, object]
) -> BitsAndBytesBase | None:
    """Find the quantized weights of a base, or None for an ordinary base.

    Raises:
        InvalidInputError: config.json names a quantization method other than
            bitsandbytes (GPTQ, AWQ, ...), or a quantized group is incomplete or
            inconsistent (names the tensor).
    """
    quantization_config = config.get("quantization_config")
    method = None
    if quantization_config is not None:
        if not isinstance(quantization_config, dict):
            raise InvalidInputError(
                "config.json: quantization_config is not an object; the base's config is corrupt"
            )
        method = quantization_config.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise InvalidInputError(
                f"BASE is quantized with {method!r} (config.json quantization_config.quant_method); "
                "lora-merge reads bitsandbytes 4-bit/8-bit and unquantized bases only: merge "
                "into the unquantized model instead"
            )
    weights = quantized_weights(entries)
    if not weights:
        # Some repos ship 16-bit weights with a bitsandbytes quantization_config so that
        # from_pretrained quantizes them on load: an ordinary base, config kept as is.
        return None
    return BitsAndBytesBase(weights=weights, config=dict(quantization_config or {}))


def merged_output_dtype(
    quantization: BitsAndBytesBase, config: Mapping[str, object]
) -> torch.dtype | None:
    """The output dtype of a model merged from a quantized base, when ``--dtype`` is ``auto``.

    4-bit: ``bnb_4bit_compute_dtype`` (the dtype QLoRA trained and ran in), else
    the quant states' dtype. 8-bit: config.json's ``dtype`` (``torch_dtype``), the
    dtype of the unquantized tensors; None keeps each tensor's own.
    """
    if quantization.is_4bit:
        return quantization.compute_dtype
    name = config.get("dtype", config.get("torch_dtype"))
    if isinstance(name, str) and name.removeprefix("torch.") in QUANT_STATE_DTYPES:
        return QUANT_STATE_DTYPES[name.removeprefix("torch.")]
    return None
