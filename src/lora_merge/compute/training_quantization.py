"""``--qlora-base``: a 16-bit weight as QLoRA training saw it, ``dequant(quant(W))``.

QLoRA (transformers' ``BitsAndBytesConfig(load_in_4bit=True)``) quantizes each
Linear weight to 4 bits when the model loads, and every forward pass of the
training computes with ``dequantize_4bit`` of it; the adapter learnt to correct
*that* weight, not W. Tensors in, tensors out: quantized with bitsandbytes'
own ``quantize_4bit`` (the codes are bitsandbytes' by construction) and
dequantized with :mod:`lora_merge.compute.dequantize`, which gives bitsandbytes'
``dequantize_4bit`` bit for bit (tests/test_quantized_bases.py), so the result
is what bitsandbytes' quantize-then-dequantize gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_merge.compute.bitsandbytes_backend import quantize_4bit_whole_with_bitsandbytes
from lora_merge.compute.dequantize import dequantize_4bit, dequantize_nested_absmax


@dataclass(frozen=True)
class TrainingQuantization:
    """How QLoRA quantized one weight.

    Attributes:
        quant_type: ``nf4`` or ``fp4`` (``bnb_4bit_quant_type``).
        blocksize: weights per absmax (64 in transformers' 4-bit loading).
        double_quant: absmax quantized again (``bnb_4bit_use_double_quant``).
        transposed: the weight is stored (in, out) (transformers' Conv1D):
            transformers quantizes its transpose, the (out, in) Linear layout.
    """

    quant_type: str
    blocksize: int
    double_quant: bool
    transposed: bool = False

    def describe(self) -> str:
        """``nf4, double quant, blocksize 64``: for the model card."""
        double = "double quant" if self.double_quant else "no double quant"
        return f"{self.quant_type}, {double}, blocksize {self.blocksize}"


def as_trained(weight: torch.Tensor, quantization: TrainingQuantization) -> torch.Tensor:
    """``dequant(quant(weight))`` in the weight's dtype and layout, on the CPU.

    Raises:
        InvalidInputError: bitsandbytes is not installed or does not load here.
    """
    values = weight.T.contiguous() if quantization.transposed else weight.contiguous()
    values = values.cpu()
    packed, absmax, nested = quantize_4bit_whole_with_bitsandbytes(
        values, quantization.quant_type, quantization.blocksize, quantization.double_quant
    )
    if nested is not None:
        nested_absmax, nested_code, nested_blocksize, offset = nested
        absmax = dequantize_nested_absmax(
            absmax, nested_absmax, nested_code, nested_blocksize, offset
        ).clone()  # without a workspace, fresh memory; clone keeps it ours either way
    result = dequantize_4bit(
        packed,
        absmax,
        quantization.quant_type,
        quantization.blocksize,
        values.numel(),
        values.dtype,
    ).reshape(values.shape)
    return result.T.contiguous() if quantization.transposed else result
