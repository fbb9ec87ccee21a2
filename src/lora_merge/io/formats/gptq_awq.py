"""GPTQ (``quant_method: gptq``) and AWQ (``quant_method: awq``) bases.

Both store a linear ``X`` transposed, as ``X.qweight`` int32, ``X.qzeros`` int32 and
``X.scales`` float16 ``(groups, out)``; GPTQ adds ``X.g_idx`` int32 ``(in,)``, the group
of each input feature (out of order under ``desc_act``). The layouts, as released
checkpoints carry them (TheBloke/Llama-2-7B-GPTQ, TheBloke/Llama-2-7B-AWQ):

- GPTQ (AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack``, GPTQModel): ``qweight``
  ``(in * bits / 32, out)``, ``32 // bits`` input features a word, the first lowest;
  ``qzeros`` ``(groups, out * bits / 32)`` packed the same way along the row. AutoGPTQ's
  checkpoints (``checkpoint_format`` ``gptq`` or absent, "v1") store each zero point
  minus one: its decoder masks the stored code and adds one back (``zeros + 1``,
  without wrapping); GPTQModel's ``gptq_v2`` stores the zero point itself. 2, 4 and
  8 bits (3-bit words straddle codes and are refused).
- AWQ GEMM (AutoAWQ ``WQLinear_GEMM.from_linear``): ``qweight`` ``(in, out / 8)`` and
  ``qzeros`` ``(groups, out / 8)``, eight 4-bit codes a word in the column order
  ``[0, 2, 4, 6, 1, 3, 5, 7]``; zero points stored as they are
  (``packing_utils.dequantize_gemm``). Other AWQ layouts (GEMV, Marlin, exllama) are
  refused by name.

Modules the quantizer skipped (``modules_to_not_convert``, ``lm_head``, embeddings)
are ordinary tensors and pass through. The decoding is
:class:`~lora_merge.io.formats.integer_weights.ColumnPackedWeight`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_merge.compute.integer_dequantize import PACKED_BITS
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.integer_weights import (
    MIN_GROUP_SIZE,
    SCALE_DTYPES,
    ColumnPackedWeight,
    bad_scales,
    column_packed_workspace_bound,
    missing_part,
    refuse_native_integer,
)
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight
from lora_merge.io.safetensors_format import TensorEntry

GPTQ_CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # -> what the decoder adds to a zero
AWQ_VERSIONS = ("gemm",)


class _ColumnPackedFormat:
    """What GPTQ and AWQ share as formats: describing, dtype, workspace, refusal."""

    name = ""
    # How messages name the format (its quant_method is lower case).
    label = ""

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        """e.g. ``gptq 4-bit (group 128, desc_act)``."""
        first = next((w for w in weights.values() if isinstance(w, ColumnPackedWeight)), None)
        if first is None:
            return self.name
        detail = f"group {first.group_size}"
        if quantization_config.get("desc_act"):
            detail += ", desc_act"
        return f"{self.name} {first.bits}-bit ({detail})"

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """None: every weight the format quantized is written in the dtype it dequantizes
        to, and every tensor it left unquantized as it is stored (see the protocol)."""
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        return column_packed_workspace_bound(tile_elements, device)

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        raise refuse_native_integer(self.label)


class GptqFormat(_ColumnPackedFormat):
    """GPTQ checkpoints of AutoGPTQ (v1) and GPTQModel (v1 or v2)."""

    name = "gptq"
    label = "GPTQ"
    quant_methods = ("gptq",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return True

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        bits = _config_int(quantization_config, "bits", self.label)
        if bits not in PACKED_BITS:
            raise InvalidInputError(
                f"config.json quantization_config.bits is {bits}: lora-merge reads "
                f"{', '.join(map(str, PACKED_BITS))}-bit GPTQ (3-bit codes straddle words)"
            )
        checkpoint_format = str(quantization_config.get("checkpoint_format", "gptq")).lower()
        if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
            raise InvalidInputError(
                f"config.json quantization_config.checkpoint_format is {checkpoint_format!r}: "
                f"lora-merge reads GPTQ checkpoints in {', '.join(GPTQ_CHECKPOINT_FORMATS)} "
                "layout (convert it back with GPTQModel, or merge into the unquantized model)"
            )
        per_word = 32 // bits
        weights: dict[str, QuantizedWeight] = {}
        for name, qweight in entries.items():
            if not name.endswith(".qweight"):
                continue
            prefix = name.removesuffix("qweight")
            if qweight.dtype != torch.int32 or len(qweight.shape) != 2:
                raise _not_packed(qweight, self.label)
            inputs, outputs = qweight.shape[0] * per_word, qweight.shape[1]
            group_size = _group_size(quantization_config, inputs, self.label)
            groups = -(-inputs // group_size)
            qzeros, scales = _zeros_and_scales(entries, prefix, qweight, self.label)
            _check_grid(scales, (groups, outputs), group_size, self.label)
            _check_grid(qzeros, (groups, -(-outputs // per_word)), group_size, self.label)
            g_idx = entries.get(f"{prefix}g_idx")
            if g_idx is not None and (g_idx.shape != (inputs,) or g_idx.dtype.is_floating_point):
                raise InvalidInputError(
                    f"BASE tensor {g_idx.name!r} is {g_idx.dtype} {g_idx.shape}, not the integer "
                    f"group of each of the {inputs} input features of {name!r}; the GPTQ "
                    "checkpoint is inconsistent"
                )
            weight = ColumnPackedWeight(
                name=f"{prefix}weight",
                shape=(outputs, inputs),
                dtype=scales.dtype,
                method=self.label,
                bits=bits,
                group_size=group_size,
                qweight=qweight,
                qzeros=qzeros,
                scales=scales,
                g_idx=g_idx,
                zero_offset=GPTQ_CHECKPOINT_FORMATS[checkpoint_format],
                awq_order=False,
            )
            weights[weight.name] = weight
        return weights


class AwqFormat(_ColumnPackedFormat):
    """AutoAWQ GEMM checkpoints (the layout transformers and vLLM load as ``awq``)."""

    name = "awq"
    label = "AWQ"
    quant_methods = ("awq",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return True

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        version = str(quantization_config.get("version", "gemm")).lower()
        bits = _config_int(quantization_config, "bits", self.label, key_alias="w_bit")
        if version not in AWQ_VERSIONS or bits != 4:
            raise InvalidInputError(
                f"config.json quantization_config has AWQ version {version!r} with {bits} bits: "
                "lora-merge reads 4-bit AWQ GEMM checkpoints (version 'gemm') only"
            )
        if quantization_config.get("zero_point") is False:
            raise InvalidInputError(
                "config.json quantization_config.zero_point is false: lora-merge reads AWQ "
                "GEMM checkpoints with zero points (AutoAWQ's layout) only"
            )
        weights: dict[str, QuantizedWeight] = {}
        for name, qweight in entries.items():
            if not name.endswith(".qweight"):
                continue
            prefix = name.removesuffix("qweight")
            if qweight.dtype != torch.int32 or len(qweight.shape) != 2:
                raise _not_packed(qweight, self.label)
            inputs, outputs = qweight.shape[0], qweight.shape[1] * 8
            group_size = _group_size(quantization_config, inputs, self.label, "q_group_size")
            groups = -(-inputs // group_size)
            qzeros, scales = _zeros_and_scales(entries, prefix, qweight, self.label)
            _check_grid(scales, (groups, outputs), group_size, self.label)
            _check_grid(qzeros, (groups, qweight.shape[1]), group_size, self.label)
            weight = ColumnPackedWeight(
                name=f"{prefix}weight",
                shape=(outputs, inputs),
                dtype=scales.dtype,
                method=self.label,
                bits=4,
                group_size=group_size,
                qweight=qweight,
                qzeros=qzeros,
                scales=scales,
                g_idx=None,
                zero_offset=0,
                awq_order=True,
            )
            weights[weight.name] = weight
        return weights


GPTQ = GptqFormat()
AWQ = AwqFormat()


def _config_int(
    config: Mapping[str, object], key: str, method: str, key_alias: str | None = None
) -> int:
    value = config.get(key, config.get(key_alias) if key_alias else None)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError(
            f"config.json quantization_config.{key} is {value!r}, not an integer; the "
            f"{method} config is corrupt"
        )
    return value


def _group_size(
    config: Mapping[str, object], inputs: int, method: str, key_alias: str | None = None
) -> int:
    """``group_size`` (-1: one group per row) as a count of input features."""
    group_size = _config_int(config, "group_size", method, key_alias)
    if group_size == -1:
        return inputs
    if group_size < MIN_GROUP_SIZE:
        raise InvalidInputError(
            f"config.json quantization_config.group_size is {group_size}: lora-merge reads "
            f"{method} groups of at least {MIN_GROUP_SIZE} input features, or -1"
        )
    return group_size


def _zeros_and_scales(
    entries: Mapping[str, TensorEntry], prefix: str, qweight: TensorEntry, method: str
) -> tuple[TensorEntry, TensorEntry]:
    qzeros = entries.get(f"{prefix}qzeros")
    scales = entries.get(f"{prefix}scales")
    if scales is None:
        raise missing_part(f"{prefix}scales", qweight.name, method)
    if qzeros is None:
        raise missing_part(f"{prefix}qzeros", qweight.name, method)
    if scales.dtype not in SCALE_DTYPES:
        raise InvalidInputError(
            f"BASE tensor {scales.name!r} is {scales.dtype}, not a float scale; the {method} "
            "checkpoint is inconsistent"
        )
    if qzeros.dtype != torch.int32:
        raise _not_packed(qzeros, method)
    return qzeros, scales


def _check_grid(entry: TensorEntry, grid: tuple[int, int], group_size: int, method: str) -> None:
    if entry.shape != grid:
        raise bad_scales(entry.name, entry.shape, f"{grid} (group size {group_size})", method)


def _not_packed(entry: TensorEntry, method: str) -> InvalidInputError:
    return InvalidInputError(
        f"BASE tensor {entry.name!r} is {entry.dtype} {entry.shape}, not an int32 matrix of "
        f"packed codes: the packed tensor's size does not match its shape; the {method} "
        "checkpoint is corrupt"
    )
