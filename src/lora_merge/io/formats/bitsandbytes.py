"""The bitsandbytes checkpoint format: which stored tensors make one quantized weight.

transformers saves a 4-bit (QLoRA, ``load_in_4bit``) weight ``X.weight`` as
packed uint8 codes plus ``X.weight.absmax``, ``X.weight.quant_map``, optionally
``X.weight.nested_absmax`` and ``X.weight.nested_quant_map`` (double
quantization), and ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``):
a uint8 tensor holding JSON with the logical shape, dtype, blocksize, quant type
and the nested blocksize, dtype and offset (bitsandbytes ``QuantState.as_dict``).
An 8-bit (LLM.int8) weight is ``X.weight`` int8 plus ``X.SCB`` (float32 scale
per row) and ``X.weight_format`` (0: row-major).

This module turns those groups into *logical* weights
(:mod:`lora_merge.io.formats.bitsandbytes_weights`, which decodes their rows)
and is the format's entry in :mod:`lora_merge.io.formats.registry`
(:data:`BITSANDBYTES`); the auxiliary tensors never reach OUT. Nothing read
from the files is trusted: every group is checked for consistency before any
data is read. ``--save-method merged_4bit`` (``merged_native`` for a 4-bit base)
writes weights back with :mod:`lora_merge.io.formats.bitsandbytes_native`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lora_merge.compute.dequantize import (
    DEQUANTIZE_CHUNK_ELEMENTS,
    FOUR_BIT_BLOCKSIZES,
    FOUR_BIT_QUANT_TYPES,
)
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.bitsandbytes_names import (
    INT8_SCALE_SUFFIX,
    QUANT_STATE_MARKER,
    is_four_bit_state,
    is_int8_scale,
)
from lora_merge.io.formats.bitsandbytes_weights import (
    ABSMAX_WINDOW_BLOCKS,
    FourBitWeight,
    Int8Weight,
    NestedAbsmax,
)
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight
from lora_merge.io.json_files import is_count, parse_json_object
from lora_merge.io.positional import read_bytes_at
from lora_merge.io.safetensors_format import TensorEntry

# Largest quant-state JSON we read (bitsandbytes writes ~200 bytes).
MAX_QUANT_STATE_BYTES = 64 * 2**10
NESTED_CODE_ENTRIES = 256
FOUR_BIT_CODE_ENTRIES = 16
# transformers' 8-bit weight_format values: only row-major weights are dequantized by
# int8_vectorwise_dequant (the others are GPU tile layouts of bitsandbytes < 0.45).
INT8_ROW_MAJOR_FORMAT = 0
QUANT_STATE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


# Absmax values per nested block in bitsandbytes' double quantization (a window is rounded
# out to whole nested blocks) and the bytes a window holds per block: the uint8 codes, their
# int32 indices, the float32 scales (plus 4/256 for the nested scales, and the 1 KiB map).
_NESTED_BLOCKSIZE = 256
_WINDOW_BYTES_PER_BLOCK = 1 + 4 + 4 + 1

BitsAndBytesWeight = FourBitWeight | Int8Weight


class BitsAndBytesFormat:
    """bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) weights, as transformers saves them."""

    name = "bitsandbytes"
    quant_methods = ("bitsandbytes",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return True

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        return dict(quantized_weights(entries))

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        """e.g. ``bitsandbytes nf4 (double quant, blocksize 64)`` or ``bitsandbytes int8``."""
        four_bit = [w for w in weights.values() if isinstance(w, FourBitWeight)]
        if not four_bit:
            return "bitsandbytes int8"
        first = four_bit[0]
        double = ", double quant" if first.nested is not None else ""
        return f"bitsandbytes {first.quant_type} (blocksize {first.blocksize}{double})"

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """4-bit: ``bnb_4bit_compute_dtype`` (the dtype QLoRA trained and ran in), else the
        quant states' dtype. 8-bit: config.json's ``dtype`` (``torch_dtype``), the dtype of
        the unquantized tensors; None keeps each tensor's own."""
        four_bit = [w for w in weights.values() if isinstance(w, FourBitWeight)]
        if four_bit:
            quantization_config = model_config.get("quantization_config")
            name = (
                quantization_config.get("bnb_4bit_compute_dtype")
                if isinstance(quantization_config, dict)
                else None
            )
            if isinstance(name, str) and name.removeprefix("torch.") in QUANT_STATE_DTYPES:
                return QUANT_STATE_DTYPES[name.removeprefix("torch.")]
            return four_bit[0].dtype
        name = model_config.get("dtype", model_config.get("torch_dtype"))
        if isinstance(name, str) and name.removeprefix("torch.") in QUANT_STATE_DTYPES:
            return QUANT_STATE_DTYPES[name.removeprefix("torch.")]
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        """A tile is widened to whole blocks on each side; its packed codes (or its int8
        codes and row scales) are read whole; the values go through one chunk of indices
        and float32 values at a time; the block scales are one window; and off the CPU the
        dequantized rows themselves (float32 at most) stay in the workspace."""
        widened = tile_elements + 2 * max(FOUR_BIT_BLOCKSIZES)
        chunk = min(widened, DEQUANTIZE_CHUNK_ELEMENTS)
        # 4-bit packed codes; int8 codes and a float32 scale per row (a row has >= 1 element).
        codes = (widened // 2 + 1) + (tile_elements + 4 * tile_elements)
        window_blocks = max(ABSMAX_WINDOW_BLOCKS, widened // min(FOUR_BIT_BLOCKSIZES) + 1)
        window = (window_blocks + 2 * _NESTED_BLOCKSIZE) * _WINDOW_BYTES_PER_BLOCK + 1024
        held = codes + 4 * (chunk // 2 + 1) + 4 * chunk + window
        if device.type != "cpu":
            held += 4 * widened
        return held

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        """bitsandbytes' own name for it is ``merged_4bit``, planned in
        :mod:`lora_merge.plan.requantize`; this format never gets here."""
        raise InvalidInputError(
            "--save-method merged_native on a bitsandbytes BASE is --save-method merged_4bit"
        )


BITSANDBYTES = BitsAndBytesFormat()


def quantized_weights(entries: Mapping[str, TensorEntry]) -> dict[str, BitsAndBytesWeight]:
    """Every bitsandbytes weight among a checkpoint's stored tensors, by logical name.

    Raises:
        InvalidInputError: a quantized group is incomplete or inconsistent (names the tensor).
    """
    weights: dict[str, BitsAndBytesWeight] = {}
    for name in entries:
        if is_four_bit_state(name):
            weight = _four_bit_weight(name, entries)
            weights[weight.name] = weight
        elif is_int8_scale(name):
            weight_8bit = _int8_weight(name, entries)
            weights[weight_8bit.name] = weight_8bit
    return weights


def _four_bit_weight(state_name: str, entries: Mapping[str, TensorEntry]) -> FourBitWeight:
    name, _, suffix_type = state_name.partition(QUANT_STATE_MARKER)
    state = _read_quant_state(entries[state_name])

    def part(suffix: str) -> TensorEntry:
        key = f"{name}.{suffix}" if suffix else name
        if key not in entries:
            raise InvalidInputError(
                f"BASE has the 4-bit quant state {state_name!r} but no {key!r}; the checkpoint "
                "is incomplete (re-download or re-save it)"
            )
        return entries[key]

    def bad(rule: str) -> InvalidInputError:
        return InvalidInputError(
            f"BASE tensor {name!r}: {rule}; the 4-bit checkpoint is corrupt or from an "
            "unsupported bitsandbytes version"
        )

    quant_type = state.get("quant_type")
    if quant_type not in FOUR_BIT_QUANT_TYPES or quant_type != suffix_type:
        raise bad(f"quant type {quant_type!r} is not nf4/fp4 or does not match {state_name!r}")
    blocksize = state.get("blocksize")
    if blocksize not in FOUR_BIT_BLOCKSIZES:
        raise bad(f"blocksize {blocksize!r} is not one of {FOUR_BIT_BLOCKSIZES}")
    dtype = QUANT_STATE_DTYPES.get(str(state.get("dtype")))
    if dtype is None:
        raise bad(f"quant state dtype {state.get('dtype')!r} is not bfloat16, float16 or float32")
    shape = state.get("shape")
    if not isinstance(shape, list) or not shape or not all(is_count(d) for d in shape):
        raise bad(f"quant state shape {shape!r} is not a list of sizes")
    numel = math.prod(shape)
    assert isinstance(blocksize, int)
    blocks = -(-numel // blocksize)
    packed = part("")
    if packed.nbytes != (numel + 1) // 2:
        raise bad(
            f"{packed.nbytes} bytes of codes for {numel} weights (expected {(numel + 1) // 2})"
        )
    quant_map = part("quant_map")
    if quant_map.dtype.torch != torch.float32 or quant_map.shape != (FOUR_BIT_CODE_ENTRIES,):
        raise bad("quant_map is not 16 float32 values")
    absmax = part("absmax")
    nested = None
    if "nested_absmax" in state or f"{name}.nested_absmax" in entries:
        nested_blocksize = state.get("nested_blocksize")
        offset = state.get("nested_offset")
        if not is_count(nested_blocksize) or nested_blocksize == 0:
            raise bad(f"nested blocksize {nested_blocksize!r} is not a positive integer")
        if not isinstance(offset, int | float) or not math.isfinite(offset):
            raise bad(f"nested offset {offset!r} is not a finite number")
        if state.get("nested_dtype", "float32") != "float32":
            raise bad(f"nested dtype {state.get('nested_dtype')!r} is not float32")
        assert isinstance(nested_blocksize, int)
        nested_absmax, nested_map = part("nested_absmax"), part("nested_quant_map")
        if absmax.dtype.torch != torch.uint8 or absmax.shape != (blocks,):
            raise bad(f"absmax is not {blocks} uint8 codes")
        if nested_absmax.dtype.torch != torch.float32 or nested_absmax.shape != (
            -(-blocks // nested_blocksize),
        ):
            raise bad("nested_absmax does not have one float32 per nested block")
        if nested_map.dtype.torch != torch.float32 or nested_map.shape != (NESTED_CODE_ENTRIES,):
            raise bad("nested_quant_map is not 256 float32 values")
        nested = NestedAbsmax(nested_absmax, nested_map, nested_blocksize, float(offset))
    elif absmax.dtype.torch != torch.float32 or absmax.shape != (blocks,):
        raise bad(f"absmax is not {blocks} float32 values")
    return FourBitWeight(
        name=name,
        shape=tuple(shape),
        dtype=dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        packed=packed,
        absmax=absmax,
        quant_map=quant_map,
        nested=nested,
        quant_state=entries[state_name],
    )


def _int8_weight(scale_name: str, entries: Mapping[str, TensorEntry]) -> Int8Weight:
    module = scale_name.removesuffix(INT8_SCALE_SUFFIX)
    name = f"{module}.weight"
    weight = entries.get(name)
    if weight is None:
        raise InvalidInputError(
            f"BASE has the 8-bit scales {scale_name!r} but no {name!r}; the checkpoint is incomplete"
        )
    scales = entries[scale_name]
    if weight.dtype.torch != torch.int8 or len(weight.shape) != 2:
        raise InvalidInputError(
            f"BASE tensor {name!r} has 8-bit scales {scale_name!r} but is {weight.dtype} "
            f"{weight.shape}, not a 2-D int8 matrix; the checkpoint is inconsistent"
        )
    if scales.dtype.torch != torch.float32 or scales.shape != weight.shape[:1]:
        raise InvalidInputError(
            f"BASE tensor {scale_name!r} is {scales.dtype} {scales.shape}, not one float32 per "
            f"row of {name!r}; the checkpoint is inconsistent"
        )
    weight_format = entries.get(f"{name}_format")
    if weight_format is not None:
        layout = _read_small(weight_format, 8)
        if weight_format.dtype.torch != torch.uint8 or layout != bytes([INT8_ROW_MAJOR_FORMAT]):
            raise InvalidInputError(
                f"BASE tensor {weight_format.name!r} says {name!r} is stored in a GPU tile layout "
                "(bitsandbytes < 0.45); load and re-save the model with a current bitsandbytes"
            )
    return Int8Weight(
        name=name, shape=weight.shape, weight=weight, row_scales=scales, weight_format=weight_format
    )


def _read_quant_state(entry: TensorEntry) -> dict[str, object]:
    raw = _read_small(entry, MAX_QUANT_STATE_BYTES)
    try:
        return parse_json_object(raw, f"BASE quant state {entry.name!r} in {entry.path.name}")
    except InvalidInputError as err:
        raise InvalidInputError(f"{err}; the checkpoint is corrupt") from err


def _read_small(entry: TensorEntry, limit: int) -> bytes:
    if entry.nbytes > limit:
        raise InvalidInputError(
            f"BASE tensor {entry.name!r} in {entry.path.name} holds {entry.nbytes} bytes, more "
            "than a bitsandbytes quant state ever does: the checkpoint is corrupt"
        )
    data = read_bytes_at(entry.path, entry.start, entry.nbytes)
    if data is None:
        raise InvalidInputError(f"{entry.path} ended inside tensor {entry.name!r}: truncated")
    return data
