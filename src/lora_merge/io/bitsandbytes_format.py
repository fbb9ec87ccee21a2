"""The bitsandbytes checkpoint format: which stored tensors make one quantized weight.

transformers saves a 4-bit (QLoRA, ``load_in_4bit``) weight ``X.weight`` as
packed uint8 codes plus ``X.weight.absmax``, ``X.weight.quant_map``, optionally
``X.weight.nested_absmax`` and ``X.weight.nested_quant_map`` (double
quantization), and ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``):
a uint8 tensor holding JSON with the logical shape, dtype, blocksize, quant type
and the nested blocksize, dtype and offset (bitsandbytes ``QuantState.as_dict``).
An 8-bit (LLM.int8) weight is ``X.weight`` int8 plus ``X.SCB`` (float32 scale
per row) and ``X.weight_format`` (0: row-major).

This module turns those groups into *logical* tensors (name, dtype, shape) so
the planner plans a quantized base as it plans a 16-bit one and the
:class:`~lora_merge.io.dequantizing_reader.DequantizingReader` knows where each
weight's pieces are; the auxiliary tensors never reach OUT. Nothing read from
the files is trusted: every group is checked for consistency before any data is
read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lora_merge.compute.dequantize import FOUR_BIT_BLOCKSIZES, FOUR_BIT_QUANT_TYPES
from lora_merge.errors import InvalidInputError
from lora_merge.io.json_files import is_count, parse_json_object
from lora_merge.io.positional import read_bytes_at
from lora_merge.io.safetensors_format import TensorEntry

QUANT_STATE_MARKER = ".quant_state.bitsandbytes__"
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


@dataclass(frozen=True)
class NestedAbsmax:
    """Double quantization of a 4-bit weight's absmax (``bnb_4bit_use_double_quant``)."""

    nested_absmax: TensorEntry  # float32, one per nested block
    nested_quant_map: TensorEntry  # float32 (256,)
    blocksize: int
    offset: float


@dataclass(frozen=True)
class FourBitWeight:
    """One NF4/FP4 weight: where its pieces are and what it stands for.

    Attributes:
        name: the logical tensor name (``X.weight``).
        shape / dtype: the logical shape and the dtype bitsandbytes dequantizes to.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: weights per absmax value.
        packed: the codes, two per byte (any storage dtype; read as bytes).
        absmax: one scale per block: float32, or uint8 codes when ``nested``.
        quant_map: the stored 16-entry codebook.
        nested: the double-quantization pieces, or None.
        quant_state: the JSON tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    packed: TensorEntry
    absmax: TensorEntry
    quant_map: TensorEntry
    nested: NestedAbsmax | None
    quant_state: TensorEntry

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_names(self) -> list[str]:
        names = [self.packed.name, self.absmax.name, self.quant_map.name, self.quant_state.name]
        if self.nested is not None:
            names += [self.nested.nested_absmax.name, self.nested.nested_quant_map.name]
        return names


@dataclass(frozen=True)
class Int8Weight:
    """One LLM.int8 weight: int8 rows and a float32 scale per row (dequantizes to float32)."""

    name: str
    shape: tuple[int, ...]
    weight: TensorEntry
    row_scales: TensorEntry
    weight_format: TensorEntry | None
    dtype: torch.dtype = torch.float32

    @property
    def stored_names(self) -> list[str]:
        names = [self.weight.name, self.row_scales.name]
        return names + ([self.weight_format.name] if self.weight_format is not None else [])


QuantizedWeight = FourBitWeight | Int8Weight


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor as the model sees it: a stored one, or a quantized weight dequantized."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    quantized: QuantizedWeight | None = None


def quantized_weights(entries: Mapping[str, TensorEntry]) -> dict[str, QuantizedWeight]:
    """Every bitsandbytes weight among a checkpoint's stored tensors, by logical name.

    Raises:
        InvalidInputError: a quantized group is incomplete or inconsistent (names the tensor).
    """
    weights: dict[str, QuantizedWeight] = {}
    for name in entries:
        if QUANT_STATE_MARKER in name:
            weight = _four_bit_weight(name, entries)
            weights[weight.name] = weight
        elif name.endswith(".SCB"):
            weight_8bit = _int8_weight(name, entries)
            weights[weight_8bit.name] = weight_8bit
    return weights


def logical_tensors(
    entries: Mapping[str, TensorEntry], weights: Mapping[str, QuantizedWeight]
) -> dict[str, LogicalTensor]:
    """Every tensor as the model sees it, in file order; auxiliary quantization tensors left out.

    Args:
        entries: the stored tensors.
        weights: the quantized weights among them (see :func:`quantized_weights`).
    """
    if not weights:
        return {n: LogicalTensor(n, e.dtype, e.shape) for n, e in entries.items()}
    by_packed_name = {}
    hidden = set()
    for weight in weights.values():
        hidden.update(weight.stored_names)
        packed = weight.packed if isinstance(weight, FourBitWeight) else weight.weight
        by_packed_name[packed.name] = weight
    tensors = {}
    for name, entry in entries.items():
        found = by_packed_name.get(name)
        if found is not None:
            tensors[found.name] = LogicalTensor(found.name, found.dtype, found.shape, found)
        elif name not in hidden:
            tensors[name] = LogicalTensor(name, entry.dtype, entry.shape)
    return tensors


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
    if quant_map.dtype != torch.float32 or quant_map.shape != (FOUR_BIT_CODE_ENTRIES,):
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
        if absmax.dtype != torch.uint8 or absmax.shape != (blocks,):
            raise bad(f"absmax is not {blocks} uint8 codes")
        if nested_absmax.dtype != torch.float32 or nested_absmax.shape != (
            -(-blocks // nested_blocksize),
        ):
            raise bad("nested_absmax does not have one float32 per nested block")
        if nested_map.dtype != torch.float32 or nested_map.shape != (NESTED_CODE_ENTRIES,):
            raise bad("nested_quant_map is not 256 float32 values")
        nested = NestedAbsmax(nested_absmax, nested_map, nested_blocksize, float(offset))
    elif absmax.dtype != torch.float32 or absmax.shape != (blocks,):
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
    module = scale_name.removesuffix(".SCB")
    name = f"{module}.weight"
    weight = entries.get(name)
    if weight is None:
        raise InvalidInputError(
            f"BASE has the 8-bit scales {scale_name!r} but no {name!r}; the checkpoint is incomplete"
        )
    scales = entries[scale_name]
    if weight.dtype != torch.int8 or len(weight.shape) != 2:
        raise InvalidInputError(
            f"BASE tensor {name!r} has 8-bit scales {scale_name!r} but is {weight.dtype} "
            f"{weight.shape}, not a 2-D int8 matrix; the checkpoint is inconsistent"
        )
    if scales.dtype != torch.float32 or scales.shape != weight.shape[:1]:
        raise InvalidInputError(
            f"BASE tensor {scale_name!r} is {scales.dtype} {scales.shape}, not one float32 per "
            f"row of {name!r}; the checkpoint is inconsistent"
        )
    weight_format = entries.get(f"{name}_format")
    if weight_format is not None:
        layout = _read_small(weight_format, 8)
        if weight_format.dtype != torch.uint8 or layout != bytes([INT8_ROW_MAJOR_FORMAT]):
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
