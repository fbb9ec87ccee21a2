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

A logical row is one expert, tens of MB decoded (gpt-oss-20b's ``gate_up_proj``:
33 MB of bf16), more than a tile, so the stream reads it a band of logical rows
at a time (:meth:`Mxfp4Weight.read_subrows`). A band of logical rows is a band of
stored *columns*: a few bytes of every stored row. Reading those bytes row by row
costs a read call per stored row per band, so each thread reads the expert's
packed bytes and exponents once (17 bits per value, 8.8 MB for gpt-oss-20b) and
keeps them while it reads the expert's bands (whole experts too: a tile that
holds experts reads each of them so). Each band is decoded
(:func:`~lora_merge.compute.mxfp4.dequantize_mxfp4_transposed`) a chunk of
:data:`MXFP4_CHUNK_ELEMENTS` values at a time, straight into the transposed
layout: only the band's values, its bytes transposed rather than its decoded values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from lora_merge.compute.mxfp4 import (
    MXFP4_BLOCK,
    MXFP4_BYTES_PER_BLOCK,
    dequantize_mxfp4_transposed,
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
_EXPERT_MEMO = "mxfp4.expert"


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
        out = stored.output((stop - start) * columns * rows, self.dtype)
        if out is None:
            out = torch.empty(
                (stop - start) * columns * rows, dtype=self.dtype, device=stored.device
            )
        result = out.view(stop - start, columns, rows)
        for expert in range(start, stop):
            self._decode(stored, expert, 0, columns, result[expert - start])
        return result

    def read_subrows(self, stored: StoredRows, expert: int, start: int, stop: int) -> torch.Tensor:
        """Logical rows ``start:stop`` of one expert, ``(stop - start, out)``, bit for bit
        those of :meth:`read_rows` (the decoding is per value)."""
        rows = self.shape[2]
        out = stored.output((stop - start) * rows, self.dtype)
        if out is None:
            out = torch.empty((stop - start) * rows, dtype=self.dtype, device=stored.device)
        result = out.view(stop - start, rows)
        self._decode(stored, expert, start, stop, result)
        return result

    def _decode(
        self, stored: StoredRows, expert: int, start: int, stop: int, out: torch.Tensor
    ) -> None:
        """Logical rows ``start:stop`` of one expert into ``out``, a chunk of
        :data:`MXFP4_CHUNK_ELEMENTS` values at a time."""
        blocks, scales = self._expert_codes(stored, expert)
        rows = self.shape[2]
        chunk = max(2, MXFP4_CHUNK_ELEMENTS // rows)
        for low in range(start, stop, chunk):
            high = min(stop, low + chunk)
            dequantize_mxfp4_transposed(
                blocks.view(rows, -1),
                scales,
                low,
                high,
                out[low - start : high - start],
                stored.workspace,
            )

    def _expert_codes(self, stored: StoredRows, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's blocks ``(out, in / 32, 16)`` and exponents ``(out, in / 32)``, read
        once for all of its bands and kept in the thread's workspace until the next expert."""
        held = stored.memo.pop(_EXPERT_MEMO, None)  # its buffers are about to be rewritten
        if isinstance(held, tuple) and held[0] == (self.blocks.name, expert):
            stored.memo[_EXPERT_MEMO] = held
            return held[1], held[2]
        _, columns, rows = self.shape
        groups = columns // MXFP4_BLOCK
        first, last = expert * rows * groups, (expert + 1) * rows * groups
        blocks = stored.byte_range(
            self.blocks,
            first * MXFP4_BYTES_PER_BLOCK,
            last * MXFP4_BYTES_PER_BLOCK,
            "mxfp4_expert_blocks",
        ).view(rows, groups, MXFP4_BYTES_PER_BLOCK)
        scales = stored.byte_range(self.scales, first, last, "mxfp4_expert_scales").view(
            rows, groups
        )
        if has_nan_scale(scales):
            raise InvalidInputError(
                f"BASE tensor {self.scales.name!r} holds the E8M0 NaN exponent (255): "
                "the MXFP4 checkpoint is corrupt (re-download it)"
            )
        stored.memo[_EXPERT_MEMO] = ((self.blocks.name, expert), blocks, scales)
        return blocks, scales


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

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        """One expert's packed bytes and exponents (17 bits a value; an expert is at most
        ``tile_elements`` read whole, ``row_elements`` read in bands), and one chunk of
        decoding: its bytes, int32 indices and float32 values (8.5 bytes a value) for at
        most :data:`MXFP4_CHUNK_ELEMENTS` values and two rows more (a chunk has at least
        two rows and may start and end inside a byte; an expert has 32 values or more a
        row, so a row is at most ``expert / 32`` values), a row of scales and their
        indices, the 3 KiB tables; off the CPU, the expert rows themselves."""
        expert = max(tile_elements, row_elements)
        row = expert // MXFP4_BLOCK
        held = expert // 2 + expert // MXFP4_BLOCK
        held += 17 * (max(MXFP4_CHUNK_ELEMENTS, 2 * row) + 2 * row) // 2 + 8 * row + 3 * 1024
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
        value at most: group views, magnitudes, quotients, rounded values, codes), and the
        expert joined from its bands (tiles may hold part of an expert)."""
        return 18 * math.prod(self.shape[1:]) + 2 * tile_budget

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        _, columns, rows = self.shape
        blocks_slot = writer.tensor(self.blocks_name)
        scales_slot = writer.tensor(self.scales_name)

        def write_expert(expert: torch.Tensor) -> None:
            blocks, exponents = quantize_mxfp4(expert.t().contiguous())
            on_bytes(blocks_slot.write(blocks.unsqueeze(0)))
            on_bytes(scales_slot.write(exponents.unsqueeze(0)))

        # Tiles hold whole experts or bands of one expert's rows, in order: bands are
        # joined into the expert, which is quantized whole (its blocks span its rows).
        joined = torch.empty(0, rows, dtype=self.dtype)
        filled = 0
        for tile in tiles:
            values = tile.to("cpu", self.dtype).reshape(-1, rows)
            offset = 0
            while offset < values.shape[0]:
                if filled == 0 and values.shape[0] - offset >= columns:
                    write_expert(values[offset : offset + columns])
                    offset += columns
                    continue
                if joined.shape[0] != columns:
                    joined = torch.empty(columns, rows, dtype=self.dtype)
                take = min(columns - filled, values.shape[0] - offset)
                joined[filled : filled + take].copy_(values[offset : offset + take])
                filled += take
                offset += take
                if filled == columns:
                    write_expert(joined)
                    filled = 0


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
