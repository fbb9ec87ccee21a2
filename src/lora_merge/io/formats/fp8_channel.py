"""FP8 with a scale per output channel or per tensor: compressed-tensors and fbgemm_fp8.

- compressed-tensors (``quant_method: compressed-tensors``, ``format:
  float-quantized``; llm-compressor's FP8 and FP8_DYNAMIC schemes, RedHatAI's
  FP8 models, served by vLLM): ``X.weight`` F8_E4M3 (or E5M2) and
  ``X.weight_scale`` in the model's dtype, ``(out, 1)`` for the ``channel``
  strategy, ``(1,)`` for ``tensor``, ``(ceil(out/bm), ceil(in/bn))`` for
  ``block`` (``block_structure``); a static activation scheme adds
  ``X.input_scale``, kept with the weight. Its decompressor
  (``NaiveQuantizationCompressor.decompress`` -> ``dequantize``) computes
  ``q * s`` in the scale's dtype: the FP8 code is exact in it, and the product
  of two such values, formed exactly in float32 (at most 4 + 11 significant
  bits), is rounded once, which is what
  :func:`~lora_merge.compute.fp8.dequantize_fp8_blocks` does.
- fbgemm_fp8 (transformers' ``FbgemmFp8Config``): ``X.weight`` F8_E4M3 and
  ``X.weight_scale`` float32 ``(out, 1)``.

Modules the config ignores (``ignore``: ``lm_head``; ``modules_to_not_convert``)
have no scale and pass through. A checkpoint whose config groups mix formats
(``format: mixed-precision``) is read by every format that recognises one of
them, each finding its own tensors by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_merge.compute.fp8 import FP8_DTYPES
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.fp8_block import FP8_BLOCK, Fp8Weight, fp8_weight
from lora_merge.io.formats.fp8_native import Fp8ChannelNative
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight
from lora_merge.io.safetensors_format import TensorEntry

SCALE_SUFFIX = ".weight_scale"
INPUT_SCALE_SUFFIX = ".input_scale"
# compressed-tensors' names for FP8 stored as FP8 (naive-quantized is its older name).
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
MIXED_FORMAT = "mixed-precision"


class CompressedTensorsFp8Format:
    """compressed-tensors ``float-quantized``: FP8 weights, per channel, tensor or block."""

    name = "compressed-tensors fp8"
    quant_methods = ("compressed-tensors",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        """Its ``format`` is float-quantized, or mixed with a float-quantized group."""
        formats = {quantization_config.get("format")}
        if MIXED_FORMAT in formats:
            formats |= {group.get("format") for group in _groups(quantization_config)}
        return any(f in FLOAT_FORMATS for f in formats)

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        blocks = {b for g in _groups(quantization_config) if (b := _block_structure(g))}
        if len(blocks) > 1:
            raise InvalidInputError(
                f"config.json quantization_config has FP8 groups of block sizes {sorted(blocks)}; "
                "lora-merge reads one block size per checkpoint"
            )
        block = next(iter(blocks), None)
        return _fp8_weights(entries, model_dtype, block)

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        return f"compressed-tensors fp8 ({_granularity(weights)})"

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """None: every weight the format quantized is written in the dtype it dequantizes
        to, and every tensor it left unquantized as it is stored (see the protocol)."""
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        return FP8_BLOCK.workspace_bound(tile_elements, device)

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        """FP8 per channel again, scales in the base's scale dtype.

        Raises:
            InvalidInputError: a per-tensor or block weight, which compressed-tensors
                quantizes from the whole weight's statistics.
        """
        assert isinstance(weight, Fp8Weight)
        if len(weight.shape) != 2 or weight.block != (1, weight.shape[1]):
            raise InvalidInputError(
                f"--save-method merged_native re-quantizes compressed-tensors FP8 per channel; "
                f"{weight.name!r} has one scale per tensor or per block, which compressed-"
                "tensors computes from the whole weight: use merged_16bit and quantize it with "
                "llm-compressor"
            )
        return Fp8ChannelNative(weight.shape, weight.scales.dtype, weight.scales.name)


class FbgemmFp8Format:
    """transformers' fbgemm_fp8: FP8 weights with a float32 scale per output channel."""

    name = "fbgemm_fp8"
    quant_methods = ("fbgemm_fp8",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return True

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        return _fp8_weights(entries, model_dtype, None)

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        return f"fbgemm fp8 ({_granularity(weights)})"

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """None: every weight the format quantized is written in the dtype it dequantizes
        to, and every tensor it left unquantized as it is stored (see the protocol)."""
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        return FP8_BLOCK.workspace_bound(tile_elements, device)

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        raise InvalidInputError(
            "--save-method merged_native writes FP8 block-wise, compressed-tensors FP8 and "
            "MXFP4 bases back; this one is fbgemm_fp8: use merged_16bit"
        )


COMPRESSED_TENSORS_FP8 = CompressedTensorsFp8Format()
FBGEMM_FP8 = FbgemmFp8Format()


def _fp8_weights(
    entries: Mapping[str, TensorEntry], dtype: torch.dtype, block: tuple[int, int] | None
) -> dict[str, QuantizedWeight]:
    """Every ``X.weight`` stored FP8 with its ``X.weight_scale``; the scale's shape tells the
    granularity (a row, the tensor, or ``block``)."""
    weights: dict[str, QuantizedWeight] = {}
    for name, entry in entries.items():
        if entry.dtype not in FP8_DTYPES or not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        scale = entries.get(f"{module}{SCALE_SUFFIX}")
        if scale is None:
            raise InvalidInputError(
                f"BASE tensor {name!r} is {entry.dtype} but has no scale tensor "
                f"{module + SCALE_SUFFIX!r}; the FP8 checkpoint is incomplete (re-download it)"
            )
        rows, cols = entry.shape[-2:] if len(entry.shape) >= 2 else (0, 0)
        if block is not None and scale.shape == (-(-rows // block[0]), -(-cols // block[1])):
            granularity: tuple[int, int] | None = block
        elif scale.shape == (rows, 1) and rows > 1:
            granularity = (1, cols)  # one scale per output channel
        else:
            granularity = None  # one scale for the tensor (fp8_weight refuses any other shape)
        input_scale = entries.get(f"{module}{INPUT_SCALE_SUFFIX}")
        extra = (input_scale,) if input_scale is not None else ()
        weights[name] = fp8_weight(name, scale.name, entries, granularity, dtype, extra)
    return weights


def _groups(quantization_config: Mapping[str, object]) -> list[Mapping[str, object]]:
    groups = quantization_config.get("config_groups")
    if not isinstance(groups, dict):
        return []
    return [g for g in groups.values() if isinstance(g, dict)]


def _block_structure(group: Mapping[str, object]) -> tuple[int, int] | None:
    weights = group.get("weights")
    block = weights.get("block_structure") if isinstance(weights, dict) else None
    if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block):
        return block[0], block[1]
    return None


def _granularity(weights: Mapping[str, QuantizedWeight]) -> str:
    kinds = set()
    for weight in weights.values():
        if isinstance(weight, Fp8Weight):
            rows, cols = weight.shape[-2:]
            if weight.block == (1, cols):
                kinds.add("per channel")
            elif weight.block == (rows, cols):
                kinds.add("per tensor")
            else:
                kinds.add(f"{weight.block[0]}x{weight.block[1]} blocks")
    return ", ".join(sorted(kinds))
