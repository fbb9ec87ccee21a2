"""MXFP4 (``quant_method: mxfp4``): gpt-oss-20b/120b's experts.

openai/gpt-oss-20b's ``model.safetensors`` stores each MoE projection ``X``
(``model.layers.N.mlp.experts.gate_up_proj`` and ``down_proj``) as
``X_blocks`` (U8, ``(experts, out, in / 32, 16)``: two E2M1 codes a byte) and
``X_scales`` (U8, ``(experts, out, in / 32)``: E8M0 exponents); everything
else (attention, router, embeddings, ``lm_head``: the config's
``modules_to_not_convert``; the experts' biases) is bf16 and passes through.
transformers dequantizes ``X`` to the model's dtype and *transposes* it to the
layout of its ``GptOssExperts`` parameters, ``(experts, in, out)``
(``integrations/mxfp4.py::_convert_moe_packed_tensors``): that is the logical
tensor here, the one a PEFT adapter on gpt-oss targets.

A logical row is one expert. It is decoded a run of stored rows at a time
(:data:`MXFP4_CHUNK_ELEMENTS` values), straight from the bytes that hold them,
and written transposed into the output, so no expert is ever held packed and
unpacked at once beyond its output rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from lora_merge.compute.mxfp4 import (
    MXFP4_BLOCK,
    MXFP4_BYTES_PER_BLOCK,
    dequantize_mxfp4,
    e2m1_pair_table,
    e8m0_scale_table,
    has_nan_scale,
    quantize_mxfp4,
)
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight, StoredRows
from lora_merge.io.safetensors_format import TensorEntry
from lora_merge.io.shard_writer import ShardWriter, TensorSpec

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
# Values decoded at once (1 MiB of float32), whatever the expert's size.
MXFP4_CHUNK_ELEMENTS = 2**18
_TABLES_MEMO = "mxfp4.tables"


@dataclass(frozen=True)
class Mxfp4Weight:
    """One MXFP4 expert tensor.

    Attributes:
        name: the logical name (``X`` of ``X_blocks``).
        shape: ``(experts, in, out)``, transformers' layout after dequantizing.
        dtype: the model's dtype.
        blocks: U8 ``(experts, out, in / 32, 16)``.
        scales: U8 ``(experts, out, in / 32)``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: TensorEntry
    scales: TensorEntry

    @property
    def stored_names(self) -> list[str]:
        return [self.blocks.name, self.scales.name]

    @property
    def anchor(self) -> str:
        return self.blocks.name

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Experts ``start:stop``, ``(stop - start, in, out)``, as transformers dequantizes them."""
        _, columns, rows = self.shape  # stored rows are the logical columns
        groups = columns // MXFP4_BLOCK
        out = stored.output((stop - start) * columns * rows, self.dtype)
        if out is None:
            out = torch.empty(
                (stop - start) * columns * rows, dtype=self.dtype, device=stored.device
            )
        result = out.view(stop - start, columns, rows)
        pair_table, scale_table = self._tables(stored)
        chunk = max(1, MXFP4_CHUNK_ELEMENTS // columns)
        values = stored.workspace.buffer("mxfp4_values", min(chunk, rows) * columns, torch.float32)
        for expert in range(start, stop):
            for low in range(0, rows, chunk):
                high = min(rows, low + chunk)
                first_row = expert * rows + low
                blocks = stored.byte_range(
                    self.blocks,
                    first_row * groups * MXFP4_BYTES_PER_BLOCK,
                    (expert * rows + high) * groups * MXFP4_BYTES_PER_BLOCK,
                    "mxfp4_blocks",
                )
                scales = stored.byte_range(
                    self.scales, first_row * groups, (expert * rows + high) * groups, "mxfp4_scales"
                ).view(high - low, groups)
                if has_nan_scale(scales):
                    raise InvalidInputError(
                        f"BASE tensor {self.scales.name!r} holds the E8M0 NaN exponent (255): "
                        "the MXFP4 checkpoint is corrupt (re-download it)"
                    )
                decoded = dequantize_mxfp4(
                    blocks.view(high - low, groups, MXFP4_BYTES_PER_BLOCK),
                    scales,
                    pair_table,
                    scale_table,
                    values[: (high - low) * columns],
                )
                result[expert - start, :, low:high].copy_(decoded.t())
        return result

    @staticmethod
    def _tables(stored: StoredRows) -> tuple[torch.Tensor, torch.Tensor]:
        tables = stored.memo.get(_TABLES_MEMO)
        if not isinstance(tables, tuple):
            tables = (e2m1_pair_table(stored.device), e8m0_scale_table(stored.device))
            stored.memo[_TABLES_MEMO] = tables
        return tables


class Mxfp4Format:
    """gpt-oss' MXFP4 experts (``quant_method: mxfp4``)."""

    name = "mxfp4"
    quant_methods = ("mxfp4",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return True

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        weights: dict[str, QuantizedWeight] = {}
        for name in entries:
            if name.endswith(BLOCKS_SUFFIX):
                weight = _weight(name.removesuffix(BLOCKS_SUFFIX), entries, model_dtype)
                weights[weight.name] = weight
            elif name.endswith(SCALES_SUFFIX):
                logical = name.removesuffix(SCALES_SUFFIX)
                if f"{logical}{BLOCKS_SUFFIX}" not in entries:
                    raise InvalidInputError(
                        f"BASE has the MXFP4 scales {name!r} but no {logical + BLOCKS_SUFFIX!r}; "
                        "the checkpoint is incomplete (re-download it)"
                    )
        return weights

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        return f"mxfp4 (e2m1, an e8m0 scale per {MXFP4_BLOCK})"

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """The model's dtype, which every weight dequantizes to."""
        return next((w.dtype for w in weights.values()), None)

    def workspace_bound(self, tile_elements: int, device: torch.device) -> int:
        """One chunk of stored rows (at least one row: a tile has at least one expert, so a
        row is at most ``tile_elements``): its bytes, scales, int32 indices and float32
        values; off the CPU, the expert rows themselves."""
        chunk = max(MXFP4_CHUNK_ELEMENTS, tile_elements)
        held = chunk // 2 + chunk // MXFP4_BLOCK + 4 * (chunk // 2) + 4 * chunk + 4 * 256 * 2
        if device.type != "cpu":
            held += 4 * tile_elements
        return held

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        """MXFP4 again, as compressed-tensors' MXFP4 quantizer makes it, in gpt-oss' layout."""
        assert isinstance(weight, Mxfp4Weight)
        return Mxfp4Native(weight.shape, weight.dtype, weight.blocks.name, weight.scales.name)


@dataclass(frozen=True)
class Mxfp4Native:
    """How one merged expert tensor is written MXFP4 in gpt-oss' layout (a
    :class:`~lora_merge.io.formats.protocol.NativeTarget`).

    Each expert (``(in, out)``, a tile holds whole experts) is transposed to the
    stored ``(out, in)`` and quantized by
    :func:`~lora_merge.compute.mxfp4.quantize_mxfp4`; its blocks and exponents are
    written as they come, each to its own tensor.

    Attributes:
        shape: ``(experts, in, out)``.
        dtype: the model's dtype, the merged values'.
        blocks_name / scales_name: the stored tensors.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks_name: str
    scales_name: str

    def stored_specs(self, name: str) -> list[TensorSpec]:
        experts, columns, rows = self.shape
        groups = columns // MXFP4_BLOCK
        return [
            TensorSpec(
                self.blocks_name, torch.uint8, (experts, rows, groups, MXFP4_BYTES_PER_BLOCK)
            ),
            TensorSpec(self.scales_name, torch.uint8, (experts, rows, groups)),
        ]

    def held_bytes(self, tile_budget: int) -> int:
        """One expert's transposed copy and what quantizing it holds (about 16 bytes per
        value at most: group views, magnitudes, quotients, rounded values, codes)."""
        return 16 * math.prod(self.shape[1:]) + 2 * tile_budget

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        blocks_slot = writer.tensor(self.blocks_name)
        scales_slot = writer.tensor(self.scales_name)
        for tile in tiles:
            for expert in tile.to("cpu", self.dtype):
                blocks, exponents = quantize_mxfp4(expert.t().contiguous())
                on_bytes(blocks_slot.write(blocks.unsqueeze(0)))
                on_bytes(scales_slot.write(exponents.unsqueeze(0)))


MXFP4 = Mxfp4Format()


def _weight(name: str, entries: Mapping[str, TensorEntry], dtype: torch.dtype) -> Mxfp4Weight:
    """The MXFP4 tensor ``name`` (``name_blocks`` and ``name_scales``), checked."""
    blocks = entries[f"{name}{BLOCKS_SUFFIX}"]
    scales = entries.get(f"{name}{SCALES_SUFFIX}")
    if scales is None:
        raise InvalidInputError(
            f"BASE has the MXFP4 blocks {blocks.name!r} but no {name + SCALES_SUFFIX!r}; the "
            "checkpoint is incomplete (re-download it)"
        )
    shape = blocks.shape
    if blocks.dtype != torch.uint8 or len(shape) != 4 or shape[-1] != MXFP4_BYTES_PER_BLOCK:
        raise InvalidInputError(
            f"BASE tensor {blocks.name!r} is {blocks.dtype} {shape}, not uint8 "
            f"(experts, rows, groups, {MXFP4_BYTES_PER_BLOCK}) as gpt-oss stores MXFP4 experts; "
            "the checkpoint is corrupt or of a layout lora-merge does not read"
        )
    if scales.dtype != torch.uint8 or scales.shape != shape[:-1]:
        raise InvalidInputError(
            f"BASE tensor {scales.name!r} is {scales.dtype} {scales.shape}, but {blocks.name!r} "
            f"{shape} needs uint8 {shape[:-1]}, one exponent per {MXFP4_BLOCK} values; the "
            "checkpoint is inconsistent"
        )
    experts, rows, groups = shape[:3]
    logical = (experts, groups * MXFP4_BLOCK, rows)
    assert math.prod(logical) == 2 * blocks.nbytes  # the header's sizes were checked on parse
    return Mxfp4Weight(name, logical, dtype, blocks, scales)
