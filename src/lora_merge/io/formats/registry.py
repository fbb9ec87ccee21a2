"""The quantization formats lora-merge reads, and how a base's format is found.

A new format is one module under :mod:`lora_merge.io.formats` (an object that
satisfies :class:`~lora_merge.io.formats.protocol.QuantizationFormat`) and one
row in :func:`formats`. A base is matched on config.json's
``quantization_config.quant_method`` (and what :meth:`accepts` reads beside it);
then every matching format finds its weights by their tensor names, so a
checkpoint may mix formats (compressed-tensors' config groups) and what no
format claims (embeddings, norms, routers, ``modules_to_not_convert``) stays an
ordinary tensor that passes through.

The format modules import torch, so they are imported by :func:`formats` when a
base has a ``quantization_config`` or bitsandbytes' tensor names: an ordinary
base is planned before torch is imported (issue 24).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_merge.dtypes import BF16, F16, F32, DType, dtype_of
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.bitsandbytes_names import names_bitsandbytes_weights
from lora_merge.io.safetensors_format import TensorEntry

if TYPE_CHECKING:
    import torch

    from lora_merge.io.formats.protocol import QuantizationFormat, QuantizedWeight

# A quantization_config without quant_method: transformers' bitsandbytes configs of old.
DEFAULT_QUANT_METHOD = "bitsandbytes"
MODEL_DTYPES = {"bfloat16": BF16, "float16": F16, "float32": F32}


def formats() -> tuple[QuantizationFormat, ...]:
    """Every format, in the order they are asked. One row per format module."""
    from lora_merge.io.formats.bitsandbytes import BITSANDBYTES
    from lora_merge.io.formats.compressed_tensors_int import COMPRESSED_TENSORS_INT
    from lora_merge.io.formats.fp8_block import FP8_BLOCK
    from lora_merge.io.formats.fp8_channel import COMPRESSED_TENSORS_FP8, FBGEMM_FP8
    from lora_merge.io.formats.gptq_awq import AWQ, GPTQ
    from lora_merge.io.formats.mxfp4 import MXFP4

    return (
        BITSANDBYTES,
        FP8_BLOCK,
        COMPRESSED_TENSORS_FP8,
        FBGEMM_FP8,
        MXFP4,
        COMPRESSED_TENSORS_INT,
        GPTQ,
        AWQ,
    )


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor as the model sees it: a stored one, or a quantized weight dequantized."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    quantized: QuantizedWeight | None = None


@dataclass(frozen=True)
class QuantizedBase:
    """What a quantized base adds to its stored tensors.

    Attributes:
        weights: logical weight name -> its quantized pieces.
        config: config.json's ``quantization_config`` (empty when the base has none).
        format_of: logical weight name -> the format that found it.
    """

    weights: dict[str, QuantizedWeight]
    config: dict[str, object]
    format_of: dict[str, QuantizationFormat]

    @property
    def method(self) -> str:
        """``quantization_config.quant_method`` (``bitsandbytes`` when the config has none)."""
        return str(self.config.get("quant_method", DEFAULT_QUANT_METHOD))

    @property
    def formats(self) -> list[QuantizationFormat]:
        """The formats of this base's weights, in table order."""
        present = {id(f) for f in self.format_of.values()}
        return [f for f in formats() if id(f) in present]

    def weights_of(self, format: QuantizationFormat) -> dict[str, QuantizedWeight]:
        """The weights one of :attr:`formats` found."""
        return {n: w for n, w in self.weights.items() if self.format_of[n] is format}

    def describe(self) -> str:
        """e.g. ``bitsandbytes nf4 (double quant, blocksize 64)`` or ``fp8 e4m3, 128x128 blocks``."""
        return "; ".join(f.describe(self.weights_of(f), self.config) for f in self.formats)

    def output_dtype(self, model_config: Mapping[str, object]) -> DType | None:
        """The dtype a merge writes when ``--dtype`` is ``auto`` (None: each tensor's own)."""
        for format in self.formats:
            dtype = format.output_dtype(self.weights_of(format), model_config)
            if dtype is not None:
                return dtype_of(dtype)
        return None


def find_quantized_base(
    entries: Mapping[str, TensorEntry], config: Mapping[str, object]
) -> QuantizedBase | None:
    """Find the quantized weights of a base, or None for an ordinary base.

    Raises:
        InvalidInputError: config.json names a quantization method no format reads
            (named in the message), or a quantized weight is incomplete or
            inconsistent (names the tensor).
    """
    quantization_config = config.get("quantization_config")
    if quantization_config is None:
        # bitsandbytes checkpoints are recognised by their tensor names alone.
        if not names_bitsandbytes_weights(entries):
            return None
        from lora_merge.io.formats.bitsandbytes import BITSANDBYTES

        found_formats: list[QuantizationFormat] = [BITSANDBYTES]
        quantization_config = {}
    elif not isinstance(quantization_config, dict):
        raise InvalidInputError(
            "config.json: quantization_config is not an object; the base's config is corrupt"
        )
    else:
        found_formats = formats_for(quantization_config)
    weights: dict[str, QuantizedWeight] = {}
    format_of: dict[str, QuantizationFormat] = {}
    claimed: dict[str, str] = {}  # stored tensor -> the logical weight that uses it
    for format in found_formats:
        found = format.find_weights(entries, quantization_config, model_dtype(config))
        for name, weight in found.items():
            for stored in weight.stored_names:
                if stored in claimed and claimed[stored] != name:
                    raise InvalidInputError(
                        f"BASE tensor {stored!r} belongs to both {claimed[stored]!r} and "
                        f"{name!r}; the quantized checkpoint is inconsistent"
                    )
                claimed[stored] = name
            weights[name] = weight
            format_of[name] = format
    if not weights:
        # Some repos ship 16-bit weights with a quantization_config so that from_pretrained
        # quantizes them on load: an ordinary base, config kept as is.
        return None
    return QuantizedBase(weights=weights, config=dict(quantization_config), format_of=format_of)


def model_dtype(config: Mapping[str, object]) -> torch.dtype:
    """config.json's ``dtype`` (or ``torch_dtype``): the dtype the model runs in; bfloat16
    when it names none of bfloat16, float16, float32 (the dtype every FP8/MXFP4 release is in)."""
    name = config.get("dtype", config.get("torch_dtype"))
    if isinstance(name, str):
        dtype = MODEL_DTYPES.get(name.removeprefix("torch."))
        if dtype is not None:
            return dtype.torch
    return BF16.torch


def formats_for(quantization_config: Mapping[str, object]) -> list[QuantizationFormat]:
    """The formats that serve this ``quantization_config``.

    Raises:
        InvalidInputError: none does (the message names the method and what is read).
    """
    method = quantization_config.get("quant_method", DEFAULT_QUANT_METHOD)
    found = [f for f in formats() if method in f.quant_methods and f.accepts(quantization_config)]
    if not found:
        known = sorted({m for f in formats() for m in f.quant_methods})
        detail = quantization_config.get("format")
        what = f"{method!r}" + (f" (format {detail!r})" if isinstance(detail, str) else "")
        raise InvalidInputError(
            f"BASE is quantized with {what} (config.json quantization_config.quant_method); "
            f"lora-merge reads {', '.join(known)} and unquantized bases only: merge into the "
            "unquantized model instead"
        )
    return found


def logical_tensors(
    entries: Mapping[str, TensorEntry], weights: Mapping[str, QuantizedWeight]
) -> dict[str, LogicalTensor]:
    """Every tensor as the model sees it, in file order; auxiliary quantization tensors left out.

    A quantized weight takes the place of its :attr:`~QuantizedWeight.anchor`.

    Args:
        entries: the stored tensors.
        weights: the quantized weights among them (see :func:`find_quantized_base`).
    """
    if not weights:
        return {n: LogicalTensor(n, e.dtype, e.shape) for n, e in entries.items()}
    by_anchor = {}
    hidden = set()
    for weight in weights.values():
        hidden.update(weight.stored_names)
        by_anchor[weight.anchor] = weight
    tensors = {}
    for name, entry in entries.items():
        found = by_anchor.get(name)
        if found is not None:
            tensors[found.name] = LogicalTensor(
                found.name, dtype_of(found.dtype), found.shape, found
            )
        elif name not in hidden:
            tensors[name] = LogicalTensor(name, entry.dtype, entry.shape)
    return tensors


def dequantize_workspace_bound(
    tile_elements: int, device: torch.device, row_elements: int = 0
) -> int:
    """The most bytes one thread's dequantization workspace holds when no tile has more than
    ``tile_elements`` weights and no weight read in bands of a row has a row of more than
    ``row_elements``, whatever the format (``working_memory_bound`` counts it once per
    thread)."""
    return max(f.workspace_bound(tile_elements, device, row_elements) for f in formats())
