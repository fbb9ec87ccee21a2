"""``--save-method merged_4bit`` / ``merged_native``: plan the quantized tensors that
replace merged weights.

Each weight to re-quantize becomes the group of stored tensors its format saves
(a :class:`~lora_merge.io.formats.protocol.NativeTarget`): the first planned
with the merge as its source, the others planned as ``written_with`` the weight
because they are known only once the whole weight is quantized.

``merged_4bit`` writes bitsandbytes 4-bit: a 4-bit base keeps its own format
weight by weight; an unquantized base gets the format from the options, applied
to the weights transformers would quantize (every 2-D weight but the embeddings
and lm_head). ``merged_native`` writes each quantized weight of the base back
in its own format; a weight the adapter leaves untouched keeps its stored
tensors byte for byte, and what the base left unquantized stays so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from lora_merge.compute.bitsandbytes_backend import require_bitsandbytes
from lora_merge.compute.training_quantization import TrainingQuantization
from lora_merge.errors import InvalidInputError
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.formats.bitsandbytes import BITSANDBYTES, FourBitWeight
from lora_merge.io.formats.bitsandbytes_native import FourBitFormat
from lora_merge.io.formats.protocol import NativeTarget
from lora_merge.io.formats.registry import LogicalTensor
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.options.values import QuantType
from lora_merge.plan.architectures import VOCAB_TENSOR_SUFFIXES, is_conv1d_module
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
        InvalidInputError: the base is 8-bit (LLM.int8), which has no 4-bit format to keep,
            or in another format (FP8, MXFP4, INT4: merged_native keeps those), or
            bitsandbytes, which quantizes, is missing or does not load.
    """
    quantization = base.quantization
    if quantization is not None and not any(
        isinstance(w, FourBitWeight) for w in quantization.weights.values()
    ):
        if quantization.method == "bitsandbytes":
            raise InvalidInputError(
                "--save-method merged_4bit needs a 4-bit or unquantized BASE; this one is "
                "8-bit (LLM.int8): use merged_16bit"
            )
        raise InvalidInputError(
            "--save-method merged_4bit writes bitsandbytes 4-bit from a bitsandbytes 4-bit "
            f"or unquantized BASE; this one is {quantization.describe()}: use merged_16bit, "
            "or merged_native to write FP8 or MXFP4 back in their own format"
        )
    require_bitsandbytes("--save-method merged_4bit")

    def target(tensor: PlannedTensor) -> NativeTarget | None:
        logical = base.tensors.get(tensor.spec.name)
        return _target_format(tensor, logical, base, quant_type, double_quant, blocksize)

    return _with_targets(plan, target)


def plan_native(plan: MergePlan, base: BaseCheckpoint) -> MergePlan:
    """The plan with every merged quantized weight re-quantized in the base's own format.

    A quantized weight the adapter does not change keeps its stored tensors as
    they are (copied byte for byte): re-quantizing its dequantized values would
    not always give the same codes back.

    Raises:
        InvalidInputError: BASE is not quantized, or its format cannot be
            re-quantized faithfully (the format says why and what to use).
    """
    quantization = base.quantization
    if quantization is None:
        raise InvalidInputError(
            "--save-method merged_native writes BASE's own quantized format, but BASE is not "
            "quantized: use merged_16bit (or merged_4bit for bitsandbytes 4-bit)"
        )
    if BITSANDBYTES in quantization.formats:
        # A 4-bit base keeps its own format weight by weight: the flags are not read.
        return plan_requantization(plan, base, QuantType.NF4, False, 64)
    tensors: list[PlannedTensor] = []
    for tensor in plan.tensors:
        logical = base.tensors.get(tensor.spec.name)
        weight = logical.quantized if logical is not None else None
        if weight is None or tensor.source != "base" or tensor.source_key != weight.name:
            tensors.append(tensor)
        elif tensor.delta is None and tensor.token_rows is None:
            tensors += [_stored_copy(base, n) for n in weight.stored_names]
        else:
            format = quantization.format_of[weight.name]
            target = format.native_target(weight, quantization.config)
            tensors += _replaced(tensor, target)
            # What the target does not write (a static input_scale) is kept as stored.
            written = {spec.name for spec in target.stored_specs(weight.name)}
            tensors += [_stored_copy(base, n) for n in weight.stored_names if n not in written]
    return replace(plan, tensors=tensors)


def _stored_copy(base: BaseCheckpoint, name: str) -> PlannedTensor:
    """A stored tensor of the base copied byte for byte."""
    entry = base.entries[name]
    return PlannedTensor(
        spec=TensorSpec(name, entry.dtype, entry.shape),
        source="base",
        source_key=name,
        source_dtype=entry.dtype,
    )


def _with_targets(
    plan: MergePlan, target_of: Callable[[PlannedTensor], NativeTarget | None]
) -> MergePlan:
    """The plan with each tensor that has a target replaced by its stored group."""
    tensors: list[PlannedTensor] = []
    for tensor in plan.tensors:
        target = target_of(tensor)
        tensors += [tensor] if target is None else _replaced(tensor, target)
    return replace(plan, tensors=tensors)


def _replaced(tensor: PlannedTensor, target: NativeTarget) -> list[PlannedTensor]:
    """The stored group that replaces ``tensor``: the first sourced from the merge, the others
    written with it."""
    name = tensor.spec.name
    first, *others = target.stored_specs(name)
    return [
        replace(tensor, spec=first, source_dtype=target.dtype, requantize=target),
        *(
            PlannedTensor(
                spec=spec,
                source="base",
                source_key=name,
                source_dtype=spec.dtype,
                written_with=first.name,
            )
            for spec in others
        ),
    ]


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
    if not _quantized_by_transformers(tensor):
        return None
    # The format records the code as the files name it, as it does for a 4-bit base's own.
    return FourBitFormat(quant_type.value, blocksize, double_quant, tensor.spec.dtype, shape)


def _quantized_by_transformers(tensor: PlannedTensor) -> bool:
    """Whether transformers' 4-bit loading quantizes this weight of an unquantized base:
    every 2-D weight but the embeddings and lm_head (its ``modules_to_not_convert``)."""
    name = tensor.spec.name
    if not name.endswith(".weight") or len(tensor.spec.shape) != 2:
        return False
    return not name.endswith(VOCAB_TENSOR_SUFFIXES) and tensor.spec.dtype.is_floating_point


def plan_training_quantization(
    plan: MergePlan, base: BaseCheckpoint, quant_type: str, double_quant: bool, blocksize: int
) -> MergePlan:
    """``--qlora-base``: every weight QLoRA quantized is read as ``dequant(quant(W))``.

    Only weights read from BASE: a tensor the adapter replaces (modules_to_save)
    was trained unquantized. transformers quantizes a Conv1D weight (stored
    (in, out)) as its transpose, which :class:`TrainingQuantization` records.

    Raises:
        InvalidInputError: BASE is quantized already (its own weights are what
            training saw), or bitsandbytes, which quantizes, does not load.
    """
    if base.quantization is not None:
        raise InvalidInputError(
            f"--qlora-base quantizes a 16-bit BASE as QLoRA training did, but BASE is stored "
            f"{base.quantization.describe()} already: merge without --qlora-base"
        )
    require_bitsandbytes("--qlora-base")
    model_type = base.config.get("model_type")
    tensors = []
    for tensor in plan.tensors:
        if tensor.source == "base" and _quantized_by_transformers(tensor):
            module = tensor.source_key.removesuffix(".weight")
            conv1d = is_conv1d_module(model_type if isinstance(model_type, str) else None, module)
            quantization = TrainingQuantization(quant_type, blocksize, double_quant, bool(conv1d))
            tensor = replace(tensor, as_trained=quantization)
        tensors.append(tensor)
    return replace(plan, tensors=tensors)


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
