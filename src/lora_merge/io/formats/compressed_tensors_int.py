"""compressed-tensors INT weights: ``pack-quantized`` (INT4/INT8 W4A16, W8A16) and
``int-quantized`` (INT8 W8A8), as llm-compressor writes them and vLLM serves them
(RedHatAI/neuralmagic ``*-quantized.w4a16`` / ``w8a8`` releases, Kimi K2 Thinking's INT4 experts).

A quantized linear ``X`` is stored (compressed-tensors 0.20,
``compressors/pack_quantized/base.py``, ``compressors/naive_quantized/base.py``) as:

- pack-quantized: ``X.weight_packed`` int32 ``(rows, ceil(columns * bits / 32))``, codes
  along each row with an offset of ``2 ** (bits - 1)``; ``X.weight_scale``
  ``(rows, groups)`` (group), ``(rows, 1)`` (channel) or one value (tensor);
  ``X.weight_shape`` int64 ``(rows, columns)``; an asymmetric group/channel weight adds
  ``X.weight_zero_point`` int32, packed the same way down the rows
  (``pack_to_int32(..., packed_dim=0)``), an asymmetric tensor weight one unpacked value;
  checkpoints of compressed-tensors before activation ordering by group was removed may
  carry ``X.weight_g_idx`` (the group of each column, -1 everywhere when unused);
- int-quantized: ``X.weight`` int8 ``(rows, columns)``, ``X.weight_scale`` as above, an
  asymmetric weight ``X.weight_zero_point`` int8 of the scale's shape; static activation
  quantization adds ``X.input_scale`` (and ``X.input_zero_point``), which a 16-bit output
  drops.

The quantization arguments (bits, symmetric, strategy, group size) come from
``quantization_config.config_groups``: the group whose ``weights`` fit the stored
tensors' shapes (several groups may share a format with other arguments). Modules
left out (``ignore``: ``lm_head``, routers, embeddings) are ordinary tensors and pass
through. Rows decode from the rows of codes, scales and zero points that cover them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lora_merge.compute.integer_dequantize import (
    PACKED_BITS,
    dequantize_codes,
    unpack_codes,
    unpack_codes_down_columns,
)
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.integer_weights import (
    SCALE_DTYPES,
    bad_scales,
    check_finite_scales,
    missing_part,
    refuse_native_integer,
)
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight, StoredRows
from lora_merge.io.positional import read_bytes_at
from lora_merge.io.safetensors_format import TensorEntry

METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
# Formats whose INT weights are stored as int8 as they are (int-quantized is W8A8's name;
# naive-quantized the older generic one).
UNPACKED_FORMATS = ("int-quantized", "naive-quantized")
STRATEGIES = ("tensor", "channel", "group")
# Activation-quantization tensors a quantized linear may carry beside its weight.
ACTIVATION_SUFFIXES = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")


@dataclass(frozen=True)
class IntArgs:
    """The ``weights`` arguments of one config group that stores INT weights."""

    bits: int
    symmetric: bool
    strategy: str
    group_size: int
    packed: bool

    def describe(self) -> str:
        layout = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        symmetry = "symmetric" if self.symmetric else "asymmetric"
        return f"int{self.bits} ({layout}, {symmetry})"


@dataclass(frozen=True)
class CompressedIntWeight:
    """One compressed-tensors INT weight (packed or int8).

    Attributes:
        name: the logical name (``X.weight``).
        shape: ``(rows, columns)``.
        dtype: the scales' dtype, which the decompressor returns.
        args: its config group's arguments.
        codes: ``X.weight_packed`` (int32) or ``X.weight`` (int8).
        scales: ``X.weight_scale``.
        zeros: ``X.weight_zero_point`` when the weight is asymmetric.
        column_groups: ``X.weight_g_idx`` when present.
        extras: the other stored tensors of the module that a 16-bit output drops
            (``weight_shape``, a symmetric weight's zero point, activation scales).
    """

    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    args: IntArgs
    codes: TensorEntry
    scales: TensorEntry
    zeros: TensorEntry | None
    column_groups: TensorEntry | None
    extras: tuple[TensorEntry, ...]

    @property
    def stored_names(self) -> list[str]:
        parts = [self.codes, self.scales, self.zeros, self.column_groups, *self.extras]
        return [p.name for p in parts if p is not None]

    @property
    def anchor(self) -> str:
        return self.codes.name

    @property
    def reads_in_chunks(self) -> bool:
        """False: a read's workspace grows with its rows (see the protocol)."""
        return False

    def check_kept(self, stored: StoredRows) -> None:
        """Never called: ``merged_native`` refuses integer bases, so no weight is kept."""
        return None

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as compressed-tensors' decompressor gives them."""
        columns = self.shape[1]
        count = stop - start
        args = self.args
        codes = stored.rows(self.codes, start, stop, "int_codes")
        if args.packed:
            codes = unpack_codes(codes, args.bits)[:, :columns]
        if args.strategy == "tensor":
            scales = stored.rows(
                self.scales, 0, self.scales.shape[0] if self.scales.shape else 1, "int_scales"
            )
            scales = scales.reshape(1, 1).expand(count, 1)
        else:
            scales = stored.rows(self.scales, start, stop, "int_scales").reshape(count, -1)
        check_finite_scales(scales, self.scales.name, METHOD)
        # Packed codes carry the offset 2**(bits-1) (zero for a symmetric weight); int8 none.
        offset = 1 << (args.bits - 1) if args.packed else 0
        zeros: torch.Tensor | int = offset
        if self.zeros is not None and not args.symmetric:
            zeros = self._zero_rows(stored, start, stop, offset)
        out = stored.output(count * columns, self.dtype)
        return dequantize_codes(
            codes,
            scales,
            zeros,
            args.group_size or columns,
            self.dtype,
            column_groups=self._column_groups(stored),
            out=None if out is None else out.view(count, columns),
        )

    def _zero_rows(self, stored: StoredRows, start: int, stop: int, offset: int) -> torch.Tensor:
        """The zero points of rows ``start:stop``, as codes with the packing offset."""
        assert self.zeros is not None
        count = stop - start
        if self.args.strategy == "tensor":
            value = stored.rows(
                self.zeros, 0, self.zeros.shape[0] if self.zeros.shape else 1, "int_zeros"
            )
            return (value.to(torch.int32) + offset).reshape(1, 1).expand(count, 1)
        if not self.args.packed:
            return stored.rows(self.zeros, start, stop, "int_zeros").to(torch.int32)
        per_word = 32 // self.args.bits
        first, last = start // per_word, -(-stop // per_word)
        words = stored.rows(self.zeros, first, last, "int_zeros")
        skip = start - first * per_word
        return unpack_codes_down_columns(words, self.args.bits)[skip : skip + count]

    def _column_groups(self, stored: StoredRows) -> torch.Tensor | None:
        """``weight_g_idx`` as indices, read once per thread; None when absent or unused
        (-1 everywhere: compressed-tensors then takes the columns in order)."""
        if self.column_groups is None:
            return None
        key = f"{METHOD}:g_idx:{self.name}"
        if key not in stored.memo:
            g_idx = stored.rows(self.column_groups, 0, self.shape[1], "int_g_idx").long().clone()
            groups = self.scales.shape[1] if len(self.scales.shape) == 2 else 1
            if bool((g_idx == -1).any()):
                stored.memo[key] = None
            elif bool((g_idx < 0).any()) or bool((g_idx >= groups).any()):
                raise InvalidInputError(
                    f"BASE tensor {self.column_groups.name!r} names groups outside 0..{groups - 1} "
                    f"(the groups of {self.scales.name!r}); the {METHOD} checkpoint is corrupt"
                )
            else:
                stored.memo[key] = g_idx
        value = stored.memo[key]
        return value if isinstance(value, torch.Tensor) else None


class CompressedTensorsIntFormat:
    """compressed-tensors ``pack-quantized`` and ``int-quantized`` INT weights."""

    name = "compressed-tensors-int"
    quant_methods = (METHOD,)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return bool(int_config_groups(quantization_config))

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        groups = int_config_groups(quantization_config)
        weights: dict[str, QuantizedWeight] = {}
        for name, entry in entries.items():
            # Other packed formats (compressed-tensors' MXFP4/NVFP4) store uint8 words.
            if name.endswith("weight_packed") and entry.dtype.torch == torch.int32:
                prefix = name.removesuffix("weight_packed")
                candidates = [a for a in groups if a.packed]
            elif name.endswith("weight") and entry.dtype.torch == torch.int8:
                prefix = name.removesuffix("weight")
                candidates = [a for a in groups if not a.packed]
                if f"{prefix}weight_scale" not in entries and not candidates:
                    continue
            else:
                continue
            weight = _weight(prefix, entries, candidates)
            weights[weight.name] = weight
        return weights

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        """e.g. ``compressed-tensors pack-quantized int4 (group 128, symmetric)``."""
        kinds = sorted(
            {
                f"{PACKED_FORMAT if w.args.packed else 'int-quantized'} {w.args.describe()}"
                for w in weights.values()
                if isinstance(w, CompressedIntWeight)
            }
        )
        return f"{METHOD} " + ", ".join(kinds)

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """None: every weight the format quantized is written in the dtype it dequantizes
        to, and every tensor it left unquantized as it is stored (see the protocol)."""
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        """A tile's codes (a byte per weight at most), their unpacking (three bytes per
        weight in flight), the float32 values, and the scales and zero points gathered per
        column (float32 each) where columns carry their groups; off the CPU, the rows."""
        held = tile_elements * (1 + 3 + 4 + 8)
        if device.type != "cpu":
            held += 4 * tile_elements
        return held

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        raise refuse_native_integer(f"{METHOD} INT")


COMPRESSED_TENSORS_INT = CompressedTensorsIntFormat()


def int_config_groups(quantization_config: Mapping[str, object]) -> list[IntArgs]:
    """The INT weight arguments of every config group stored packed or as int8.

    Raises:
        InvalidInputError: a group's INT arguments are malformed or not read by lora-merge.
    """
    groups = quantization_config.get("config_groups")
    if not isinstance(groups, dict):
        return []
    default_format = quantization_config.get("format")
    found = []
    for group_name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            continue
        weights = group["weights"]
        format = group.get("format") or default_format
        if weights.get("type", "int") != "int" or format not in (PACKED_FORMAT, *UNPACKED_FORMATS):
            continue
        bits = weights.get("num_bits", 8)
        strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "tensor")
        group_size = weights.get("group_size")
        packed = format == PACKED_FORMAT
        where = f"config.json quantization_config.config_groups.{group_name}.weights"
        if bits not in (PACKED_BITS if packed else (8,)) or strategy not in STRATEGIES:
            raise InvalidInputError(
                f"{where}: {bits}-bit {strategy!r} {format} weights are not read by lora-merge "
                f"(it reads {', '.join(map(str, PACKED_BITS))}-bit packed and 8-bit int-quantized "
                f"weights, strategies {', '.join(STRATEGIES)})"
            )
        if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
            raise InvalidInputError(
                f"{where}: strategy 'group' with group_size {group_size!r}; the config is corrupt"
            )
        found.append(
            IntArgs(
                bits=bits,
                symmetric=bool(weights.get("symmetric", True)),
                strategy=strategy,
                group_size=group_size if strategy == "group" else 0,
                packed=packed,
            )
        )
    return found


def _weight(
    prefix: str, entries: Mapping[str, TensorEntry], candidates: list[IntArgs]
) -> CompressedIntWeight:
    """The weight of module ``prefix`` under the config group whose arguments fit its tensors."""
    packed = f"{prefix}weight_packed" in entries
    codes = entries[f"{prefix}weight_packed" if packed else f"{prefix}weight"]
    scales = entries.get(f"{prefix}weight_scale")
    zeros = entries.get(f"{prefix}weight_zero_point")
    g_idx = entries.get(f"{prefix}weight_g_idx")
    shape_entry = entries.get(f"{prefix}weight_shape")
    if scales is None:
        raise missing_part(f"{prefix}weight_scale", codes.name, METHOD)
    if not candidates:
        raise InvalidInputError(
            f"BASE tensor {codes.name!r} is {'packed' if packed else 'int8'} INT, but no "
            "config.json quantization_config.config_groups entry stores INT weights "
            f"{'packed' if packed else 'as int8'}; the {METHOD} config does not describe it"
        )
    expected_dtype = torch.int32 if packed else torch.int8
    if codes.dtype.torch != expected_dtype or len(codes.shape) != 2:
        raise InvalidInputError(
            f"BASE tensor {codes.name!r} is {codes.dtype} {codes.shape}, not a {expected_dtype} "
            f"matrix (lora-merge reads 2-D {METHOD} weights); the checkpoint is "
            "inconsistent or of a layout lora-merge does not read"
        )
    if scales.dtype.torch not in SCALE_DTYPES:
        raise InvalidInputError(
            f"BASE tensor {scales.name!r} is {scales.dtype}, not a float scale; the {METHOD} "
            "checkpoint is inconsistent"
        )
    shape = _stored_shape(shape_entry) if shape_entry is not None else None
    rows = codes.shape[0]
    problems = []
    for args in candidates:
        columns, problem = _fit(args, codes, scales, zeros, shape)
        if problem is None:
            extras = tuple(
                e
                for e in (
                    shape_entry,
                    zeros if args.symmetric else None,
                    *(entries.get(f"{prefix}{suffix}") for suffix in ACTIVATION_SUFFIXES),
                )
                if e is not None
            )
            if g_idx is not None and (g_idx.shape != (columns,) or g_idx.dtype.is_floating_point):
                raise InvalidInputError(
                    f"BASE tensor {g_idx.name!r} is {g_idx.dtype} {g_idx.shape}, not the "
                    f"integer group of each of the {columns} columns; the {METHOD} checkpoint "
                    "is inconsistent"
                )
            return CompressedIntWeight(
                name=f"{prefix}weight",
                shape=(rows, columns),
                dtype=scales.dtype.torch,
                args=args,
                codes=codes,
                scales=scales,
                zeros=None if args.symmetric else zeros,
                column_groups=g_idx,
                extras=extras,
            )
        problems.append(problem)
    raise problems[0]


def _fit(
    args: IntArgs,
    codes: TensorEntry,
    scales: TensorEntry,
    zeros: TensorEntry | None,
    shape: tuple[int, int] | None,
) -> tuple[int, InvalidInputError | None]:
    """The weight's column count under ``args``, or why ``args`` do not fit its tensors."""
    rows, stored_columns = codes.shape
    per_word = 32 // args.bits if args.packed else 1
    if shape is not None:
        columns = shape[1]
        words = -(-columns * args.bits // 32) if args.packed else columns
        if shape[0] != rows or words != stored_columns:
            return 0, InvalidInputError(
                f"BASE tensor {codes.name!r} is {codes.shape}, but a {shape} weight of "
                f"{args.bits}-bit codes needs {(shape[0], words)}: the packed tensor's size "
                f"does not match its shape; the {METHOD} checkpoint is corrupt"
            )
    elif args.strategy == "group" and len(scales.shape) == 2:
        columns = scales.shape[1] * args.group_size
    else:
        columns = stored_columns * per_word
    if args.strategy == "group":
        grid: tuple[int, ...] = (rows, -(-columns // args.group_size))
        fits = scales.shape == grid and columns % args.group_size == 0
        expected = f"{grid} (group size {args.group_size})"
    elif args.strategy == "channel":
        grid = (rows, 1)
        fits = scales.shape in (grid, (rows,))
        expected = f"{grid}"
    else:
        grid = (1,)
        fits = math.prod(scales.shape) == 1
        expected = "one value"
    if not fits or (args.packed and -(-columns * args.bits // 32) != stored_columns):
        return columns, bad_scales(scales.name, scales.shape, expected, METHOD)
    if args.symmetric:
        return columns, None
    if zeros is None:
        return columns, missing_part(
            scales.name.replace("weight_scale", "weight_zero_point"), codes.name, METHOD
        )
    if args.strategy == "tensor":
        zero_grid: tuple[int, ...] = grid
        zero_fits = math.prod(zeros.shape) == 1
    elif args.packed:
        zero_grid = (-(-rows // per_word), grid[1])
        zero_fits = zeros.shape == zero_grid and zeros.dtype.torch == torch.int32
    else:
        zero_grid = grid
        zero_fits = zeros.shape in (grid, grid[:1]) and not zeros.dtype.is_floating_point
    if not zero_fits:
        return columns, bad_scales(zeros.name, zeros.shape, f"{zero_grid}", METHOD)
    return columns, None


def _stored_shape(entry: TensorEntry) -> tuple[int, int]:
    """``X.weight_shape``'s two values (int64, or int32 in older writers)."""
    if entry.shape != (2,) or entry.dtype.torch not in (torch.int64, torch.int32):
        raise InvalidInputError(
            f"BASE tensor {entry.name!r} is {entry.dtype} {entry.shape}, not the two sizes of "
            f"a weight; the {METHOD} checkpoint is corrupt"
        )
    data = read_bytes_at(entry.path, entry.start, entry.nbytes)
    if data is None:
        raise InvalidInputError(f"{entry.path} ended inside tensor {entry.name!r}: truncated")
    size = entry.dtype.itemsize
    # safetensors stores little-endian whatever the host.
    values = [int.from_bytes(data[i : i + size], "little", signed=True) for i in (0, size)]
    if min(values) < 0:
        raise InvalidInputError(
            f"BASE tensor {entry.name!r} holds the shape {values}; the {METHOD} checkpoint "
            "is corrupt"
        )
    return values[0], values[1]
