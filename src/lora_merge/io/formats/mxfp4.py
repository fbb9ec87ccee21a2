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
holds experts reads each of them so). A band is decoded in the stored order
(:func:`~lora_merge.compute.mxfp4.dequantize_mxfp4_bytes`, one lookup a byte) and
handed out as its transpose, a strided view: no byte or value is transposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from lora_merge.compute.mxfp4 import (
    MXFP4_BLOCK,
    MXFP4_BYTES_PER_BLOCK,
    MXFP4_PAIR_TABLE_BYTES,
    dequantize_mxfp4_bytes,
    has_nan_scale,
    quantize_mxfp4,
)
from lora_merge.dtypes import U8
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight, StoredRows
from lora_merge.io.safetensors_format import TensorEntry
from lora_merge.io.shard_writer import ShardWriter, TensorSpec

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
# Values decoded at once (1 MiB of float32), whatever the expert's size.
MXFP4_CHUNK_ELEMENTS = 2**18
# Merged values re-quantized at once (``merged_native``): whole group rows of 32 logical
# rows, or part of one's stored rows, so about 1.5 MB of workspace (bfloat16) whatever the
# expert's size (2**18, a whole group row of gpt-oss-20b's gate_up_proj, held 3.5 MB more a
# thread, measured, for a few percent less CPU time).
MXFP4_QUANTIZE_CHUNK_ELEMENTS = 2**16
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

    @property
    def reads_in_chunks(self) -> bool:
        """False: a read's workspace grows with its rows (see the protocol)."""
        return False

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Experts ``start:stop``, ``(stop - start, in, out)``, as transformers dequantizes them:
        each expert decoded a chunk of :data:`MXFP4_CHUNK_ELEMENTS` values (whole stored
        rows) at a time, and transposed as it is rounded to the model's dtype."""
        _, columns, rows = self.shape  # stored rows are the logical columns
        out = stored.output((stop - start) * columns * rows, self.dtype)
        if out is None:
            out = torch.empty(
                (stop - start) * columns * rows, dtype=self.dtype, device=stored.device
            )
        result = out.view(stop - start, columns, rows)
        step = max(1, MXFP4_CHUNK_ELEMENTS // columns)
        for expert in range(start, stop):
            blocks, scales = self._expert_codes(stored, expert)
            for low in range(0, rows, step):
                high = min(rows, low + step)
                values = stored.workspace.buffer(
                    "mxfp4_values", (high - low) * columns, torch.float32
                )
                values = values.view(high - low, columns)
                dequantize_mxfp4_bytes(
                    blocks.view(rows, -1)[low:high],
                    scales[low:high],
                    0,
                    columns // 2,
                    values,
                    stored.workspace,
                )
                # The float32 product, rounded once to the model's dtype as it is stored.
                result[expert - start, :, low:high].copy_(values.t())
        return result

    def read_subrows(
        self,
        stored: StoredRows,
        expert: int,
        start: int,
        stop: int,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Logical rows ``start:stop`` of one expert, ``(stop - start, out)``, bit for bit
        those of :meth:`read_rows` (the decoding is per value).

        The band is decoded in the stored order (:func:`dequantize_mxfp4_bytes`: bytes
        ``start // 2:ceil(stop / 2)`` of every stored row) and handed out as its transpose,
        a view whose rows are strided: no value is transposed, and a merge whose LoRA
        product is laid out ``(out, rows)`` (PEFT's transposed expert weights) adds it
        element by element in memory order.

        With ``compute_dtype`` float32 and a bfloat16 or float32 model, the values stay in
        float32: every decoded product (a 2-bit significand times a power of two from
        ``2 ** -127`` to ``2 ** 127``) is a bfloat16 value, or infinity in both, so they
        are the model's values widened exactly, without the rounding to bfloat16 and the
        caller's widening back (``tests/test_decode_kernels.py`` checks this on every
        byte under every exponent). Otherwise they are rounded to the model's dtype.
        """
        rows = self.shape[2]
        first, last = start // 2, -(-stop // 2)
        width = 2 * (last - first)
        blocks, scales = self._expert_codes(stored, expert)
        wide = compute_dtype == torch.float32 and self.dtype in (torch.bfloat16, torch.float32)
        dtype = torch.float32 if wide else self.dtype
        out = stored.output(rows * width, dtype)
        if out is None:
            out = torch.empty(rows * width, dtype=dtype, device=stored.device)
        out = out.view(rows, width)
        if dtype == torch.float32:
            values = out
        else:
            values = stored.workspace.buffer("mxfp4_values", rows * width, torch.float32)
            values = values.view(rows, width)
        dequantize_mxfp4_bytes(blocks.view(rows, -1), scales, first, last, values, stored.workspace)
        if values is not out:
            # The float32 product, rounded once to the model's dtype as it is stored.
            out.copy_(values)
        return out.t()[start - 2 * first : stop - 2 * first]

    def check_kept(self, stored: StoredRows) -> None:
        """No E8M0 NaN exponent, read one expert's exponents at a time."""
        per_expert = math.prod(self.scales.shape[1:])
        stored.memo.pop(_EXPERT_MEMO, None)  # the exponents' buffer is reused below
        for expert in range(self.scales.shape[0]):
            first = expert * per_expert
            scales = stored.byte_range(
                self.scales, first, first + per_expert, "mxfp4_expert_scales"
            )
            self._check_scales(scales)

    def _check_scales(self, scales: torch.Tensor) -> None:
        if has_nan_scale(scales):
            raise InvalidInputError(
                f"BASE tensor {self.scales.name!r} holds the E8M0 NaN exponent (255): "
                "the MXFP4 checkpoint is corrupt (re-download it)"
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
        self._check_scales(scales)
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
        """None: every weight the format quantized is written in the dtype it dequantizes
        to, and every tensor it left unquantized as it is stored (see the protocol)."""
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        """One expert's packed bytes and exponents (17 bits a value; an expert is at most
        ``tile_elements`` read whole, ``row_elements`` read in bands), and for a band or a
        chunk of a whole expert (at most a tile and two rows more: a band may start and end
        inside a byte; an expert has 32 values or more a row, so a row is at most
        ``expert / 32`` values) an int32 index a byte, float32 values and the rows handed
        out in float32 where the caller's buffer does not hold them (10 bytes a value); a
        column of int32 offsets; the 512 KiB table; off the CPU, the expert rows
        themselves."""
        expert = max(tile_elements, row_elements)
        row = expert // MXFP4_BLOCK
        held = expert // 2 + expert // MXFP4_BLOCK
        held += 10 * (max(tile_elements, MXFP4_CHUNK_ELEMENTS) + 2 * row) + 4 * row
        held += MXFP4_PAIR_TABLE_BYTES
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

    A logical row (``in``) of an expert is a stored column, and an E8M0 exponent
    covers 32 consecutive values of a stored row: 32 consecutive logical rows of
    one expert, the same 32 for every stored row. So 32 logical rows (a *group
    row*) quantize on their own, and every block and exponent of the expert is
    the whole expert's (compressed-tensors' quantizer is per group). The merged
    rows are therefore quantized as they come, a run of whole group rows at a
    time (:data:`MXFP4_QUANTIZE_CHUNK_ELEMENTS` values, or part of one group row's
    stored rows), each transposed to the stored ``(out, in)`` and quantized by
    :func:`~lora_merge.compute.mxfp4.quantize_mxfp4`; a band that ends inside a
    group row leaves its last rows (fewer than 32) in a small buffer that the next
    band completes. A band of logical rows is a band of stored *columns* (a few
    bytes of every stored row), so its codes are placed into the expert's packed
    bytes and exponents (17 bits a value, 8.8 MB for gpt-oss-20b's
    ``gate_up_proj``), which are written once the expert is complete: no expert
    is ever held unpacked.

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
            TensorSpec(self.blocks_name, U8, (experts, rows, groups, MXFP4_BYTES_PER_BLOCK)),
            TensorSpec(self.scales_name, U8, (experts, rows, groups)),
        ]

    @property
    def run_groups(self) -> int:
        """Group rows (32 logical rows each) quantized at once: at least one (a run of its
        stored rows at a time where one is more than a run)."""
        return max(1, MXFP4_QUANTIZE_CHUNK_ELEMENTS // (MXFP4_BLOCK * self.shape[2]))

    def held_bytes(self, tile_budget: int) -> int:
        """The expert's packed bytes and exponents (17 bits a value), the rows of a group
        row a band cut, one run's transposed copy and what quantizing it holds (quotients,
        magnitudes, signs, rounded values, masks, codes: measured at up to ``8 * itemsize
        + 3`` bytes a value in bfloat16 and float32, counted as ``9 * itemsize + 4``), and
        a tile converted to the model's dtype."""
        _, columns, rows = self.shape
        itemsize = self.dtype.itemsize
        expert = columns * rows // 2 + columns * rows // MXFP4_BLOCK
        partial = itemsize * MXFP4_BLOCK * rows
        run = min(self.run_groups * MXFP4_BLOCK * rows, MXFP4_QUANTIZE_CHUNK_ELEMENTS)
        return expert + partial + (10 * itemsize + 4) * run + tile_budget

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        _, columns, rows = self.shape
        groups = columns // MXFP4_BLOCK
        blocks_slot = writer.tensor(self.blocks_name)
        scales_slot = writer.tensor(self.scales_name)
        blocks = torch.empty((rows, groups, MXFP4_BYTES_PER_BLOCK), dtype=torch.uint8)
        exponents = torch.empty((rows, groups), dtype=torch.uint8)
        partial = torch.empty((MXFP4_BLOCK, rows), dtype=self.dtype)
        run_rows = self.run_groups * MXFP4_BLOCK
        done = 0  # logical rows of the current expert quantized (a multiple of 32)
        held = 0  # rows of the next group row in ``partial``

        def quantize(values: torch.Tensor) -> None:
            """Whole group rows ``done:done + len(values)`` of the current expert, a run of
            stored rows at a time when one group row is more than a run (gpt-oss-20b's
            ``gate_up_proj``: 32 x 5760): each stored row's groups quantize on their own."""
            nonlocal done
            first, count = done // MXFP4_BLOCK, values.shape[0] // MXFP4_BLOCK
            step = max(1, MXFP4_QUANTIZE_CHUNK_ELEMENTS // values.shape[0])
            for low in range(0, rows, step):
                high = min(rows, low + step)
                run_blocks, run_exponents = quantize_mxfp4(values[:, low:high].t().contiguous())
                blocks[low:high, first : first + count].copy_(run_blocks)
                exponents[low:high, first : first + count].copy_(run_exponents)
            done += values.shape[0]
            if done == columns:
                on_bytes(blocks_slot.write(blocks.unsqueeze(0)))
                on_bytes(scales_slot.write(exponents.unsqueeze(0)))
                done = 0

        # Tiles hold whole experts or bands of one expert's rows, in order; ``in`` is a
        # multiple of 32, so no group row spans two experts.
        for tile in tiles:
            values = tile.to("cpu", self.dtype).reshape(-1, rows)
            offset = 0
            while offset < values.shape[0]:
                left = values.shape[0] - offset
                if held:  # complete the group row the last band cut
                    take = min(MXFP4_BLOCK - held, left)
                    partial[held : held + take].copy_(values[offset : offset + take])
                    held += take
                    offset += take
                    if held == MXFP4_BLOCK:
                        quantize(partial)
                        held = 0
                    continue
                whole = min(left // MXFP4_BLOCK * MXFP4_BLOCK, run_rows, columns - done)
                if whole:
                    quantize(values[offset : offset + whole])
                    offset += whole
                else:  # fewer than 32 rows left in this tile: kept for the next one
                    partial[:left].copy_(values[offset:])
                    held = left
                    offset += left
        assert done == 0 and held == 0, f"{name}: tiles ended inside an expert"


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
    if blocks.dtype.torch != torch.uint8 or len(shape) != 4 or shape[-1] != MXFP4_BYTES_PER_BLOCK:
        raise InvalidInputError(
            f"BASE tensor {blocks.name!r} is {blocks.dtype} {shape}, not uint8 "
            f"(experts, rows, groups, {MXFP4_BYTES_PER_BLOCK}) as gpt-oss stores MXFP4 experts; "
            "the checkpoint is corrupt or of a layout lora-merge does not read"
        )
    if scales.dtype.torch != torch.uint8 or scales.shape != shape[:-1]:
        raise InvalidInputError(
            f"BASE tensor {scales.name!r} is {scales.dtype} {scales.shape}, but {blocks.name!r} "
            f"{shape} needs uint8 {shape[:-1]}, one exponent per {MXFP4_BLOCK} values; the "
            "checkpoint is inconsistent"
        )
    experts, rows, groups = shape[:3]
    logical = (experts, groups * MXFP4_BLOCK, rows)
    assert math.prod(logical) == 2 * blocks.nbytes  # the header's sizes were checked on parse
    return Mxfp4Weight(name, logical, dtype, blocks, scales)
