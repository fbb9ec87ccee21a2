"""``--save-method merged_4bit``: plan the 4-bit tensors that replace merged weights.

Each weight to re-quantize becomes the group transformers saves for a
bitsandbytes 4-bit weight (see :mod:`lora_merge.inputs.quantized`): the packed
codes under the weight's name, planned with the merge as its source, plus the
auxiliary tensors, planned as ``written_with`` the weight because they are
known only once the whole weight is quantized. A 4-bit base keeps its own
format weight by weight; an unquantized base gets the format from the options,
applied to the weights transformers would quantize (every 2-D weight but the
embeddings and lm_head).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lora_merge.compute.bitsandbytes_backend import require_bitsandbytes
from lora_merge.errors import InvalidInputError
from lora_merge.inputs.quantized import FourBitWeight, LogicalTensor
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.options.values import QuantType
from lora_merge.plan.architectures import VOCAB_TENSOR_SUFFIXES
from lora_merge.plan.four_bit_format import FourBitFormat
from lora_merge.plan.model import MergePlan, PlannedTensor


def plan_requantization(
    plan: MergePlan,
    base: BaseCheckpoint,
    quant_type: QuantType,
    double_quant: bool,
    blocksize: int,
) -> MergePlan:
    """The plan with every weight to re-quantize replaced by its 4-bit group.

    Raises:
        InvalidInputError: the base is 8-bit (LLM.int8), which has no 4-bit format to keep, or
            bitsandbytes, which quantizes, is missing or does not load.
    """
    if base.quantization is not None and not base.quantization.is_4bit:
        raise InvalidInputError(
            "--save-method merged_4bit needs a 4-bit or unquantized BASE; this one is 8-bit "
            "(LLM.int8): use merged_16bit"
        )
    require_bitsandbytes("--save-method merged_4bit")
    tensors: list[PlannedTensor] = []
    for tensor in plan.tensors:
        logical = base.tensors.get(tensor.spec.name)
        target = _target_format(tensor, logical, base, quant_type, double_quant, blocksize)
        if target is None:
            tensors.append(tensor)
            continue
        name = tensor.spec.name
        packed = TensorSpec(name, torch.uint8, ((target.numel + 1) // 2, 1))
        tensors.append(
            replace(
                tensor,
                spec=packed,
                source_dtype=target.dtype,
                requantize=target,
            )
        )
        tensors += [
            PlannedTensor(
                spec=spec,
                source="base",
                source_key=name,
                source_dtype=spec.dtype,
                written_with=name,
            )
            for spec in target.auxiliary_specs(name)
        ]
    return replace(plan, tensors=tensors)


def _target_format(
    tensor: PlannedTensor,
    logical: LogicalTensor | None,
    base: BaseCheckpoint,
    quant_type: QuantType,
    double_quant: bool,
    blocksize: int,
) -> FourBitFormat | None:
    """The 4-bit format of this output tensor, or None to write it as planned."""
    shape = tensor.spec.shape
    if logical is not None and isinstance(logical.quantized, FourBitWeight):
        weight = logical.quantized
        # The base's own format, down to the dtype its quant states record.
        return FourBitFormat(
            weight.quant_type, weight.blocksize, weight.nested is not None, weight.dtype, shape
        )
    if base.quantization is not None:
        return None  # a 4-bit base: what it did not quantize stays unquantized
    name = tensor.spec.name
    if not name.endswith(".weight") or len(shape) != 2 or name.endswith(VOCAB_TENSOR_SUFFIXES):
        return None
    if not tensor.spec.dtype.is_floating_point:
        return None
    # The format records the code as the files name it, as it does for a 4-bit base's own.
    return FourBitFormat(quant_type.value, blocksize, double_quant, tensor.spec.dtype, shape)


def requantized_config(
    base: BaseCheckpoint,
    quant_type: QuantType,
    double_quant: bool,
    compute_dtype: torch.dtype | None,
) -> dict[str, object]:
    """config.json's ``quantization_config`` for merged_4bit output.

    A 4-bit base's own is kept; for an unquantized base, the one transformers
    writes for ``BitsAndBytesConfig(load_in_4bit=True, ...)``.
    """
    if base.quantization is not None:
        return dict(base.quantization.config)
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype or torch.float32).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.value,  # config.json holds the name
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
