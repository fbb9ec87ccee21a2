"""Block-wise FP8 (``quant_method: fp8``): DeepSeek-V3/R1, Qwen3-*-FP8, MiniMax-M2, GLM FP8.

transformers' ``FineGrainedFP8Config`` (``quantizers/quantizer_finegrained_fp8.py``,
``integrations/finegrained_fp8.py``) and DeepSeek's own release
(deepseek-ai/DeepSeek-V3, ``inference/kernel.py::weight_dequant``) store a
linear ``X`` as ``X.weight`` (F8_E4M3, ``(rows, cols)``) and
``X.weight_scale_inv`` (F32, ``(ceil(rows / bm), ceil(cols / bn))`` for
``weight_block_size: [bm, bn]``, usually ``[128, 128]``); experts fused into
one tensor (transformers' ``FP8Experts``) store ``X.gate_up_proj`` and
``X.gate_up_proj_scale_inv`` with the experts as a leading dimension. Without
``weight_block_size`` the scale is one value for the whole tensor. Weights the
config leaves unquantized (``modules_to_not_convert``: embeddings, norms,
``lm_head``, routers) are ordinary tensors and pass through.

Rows of a weight are decoded from the rows of codes and of scale blocks that
cover them (:func:`~lora_merge.compute.fp8.dequantize_fp8_blocks`), so a tile
never reads the whole tensor. Scales are checked for NaN/Inf as they are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lora_merge.compute.fp8 import (
    FP8_CHUNK_ELEMENTS,
    FP8_DTYPES,
    dequantize_fp8_blocks,
    scale_rows_for,
)
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.fp8_native import Fp8BlockNative
from lora_merge.io.formats.protocol import NativeTarget, QuantizedWeight, StoredRows
from lora_merge.io.safetensors_format import TensorEntry

# Codes read and checked at once on the CPU (1 MiB): what the stream's I/O tile of 16-bit
# rows holds (2 MiB), so that such a read is one run (each run's reads, scale check and
# calls cost ~70 us: 0.25-0.3 ns a value in runs of FP8_CHUNK_ELEMENTS, measured on one
# core at a DeepSeek-V3 expert's width); workspace_bound counts them.
FP8_READ_ELEMENTS = 2**20
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv; X.gate_up_proj -> ..._scale_inv
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Smallest block side accepted: it bounds the scale rows a tile reads (real releases use 128).
MIN_BLOCK_SIDE = 16


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 weight with a float scale per block (the formats of this module and of
    :mod:`lora_merge.io.formats.fp8_channel`: a block may be a whole row or the whole matrix).

    Attributes:
        name: the logical tensor name (the stored codes' name).
        shape: ``(*experts, rows, cols)``.
        dtype: the model's dtype, which transformers dequantizes to.
        block: ``(bm, bn)``; ``(1, cols)`` for a scale per row, ``(rows, cols)`` for one
            per tensor.
        codes: the FP8 codes.
        scales: the scales, ``(*experts, ceil(rows/bm), ceil(cols/bn))`` (one per tensor:
            any shape of one element).
        extra: other stored tensors of the module that belong with the weight (a static
            ``input_scale``): hidden from a 16-bit output, copied into a native one.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    block: tuple[int, int]
    codes: TensorEntry
    scales: TensorEntry
    extra: tuple[TensorEntry, ...] = ()

    @property
    def stored_names(self) -> list[str]:
        return [self.codes.name, self.scales.name, *(e.name for e in self.extra)]

    @property
    def anchor(self) -> str:
        return self.codes.name

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (of the first dimension) as transformers' ``Fp8Dequantize``
        gives them."""
        out = stored.output((stop - start) * math.prod(self.shape[1:]), self.dtype)
        if out is None:
            out = torch.empty(
                (stop - start) * math.prod(self.shape[1:]), dtype=self.dtype, device=stored.device
            )
        result = out.view(stop - start, *self.shape[1:])
        if len(self.shape) == 2:
            self._matrix_rows(stored, start, stop, result, None)
            return result
        for index in range(start, stop):  # one expert (leading index) at a time
            self._matrix_rows(stored, 0, self.shape[-2], result[index - start], index)
        return result

    @property
    def reads_in_chunks(self) -> bool:
        """True for a matrix, whose rows are read and decoded a run at a time on the CPU
        (:meth:`_matrix_rows`; the stream reads larger tiles on the CPU only); fused
        experts read a whole expert's codes."""
        return len(self.shape) == 2

    def _matrix_rows(
        self, stored: StoredRows, start: int, stop: int, out: torch.Tensor, expert: int | None
    ) -> None:
        """Rows ``start:stop`` of one matrix (of expert ``expert``, or the whole tensor)."""
        cols = self.shape[-1]
        if expert is None:
            # On the CPU, the codes and scales of a run of rows at a time
            # (FP8_READ_ELEMENTS codes, or one row), so the workspace is the same for a read
            # of any size and the stream reads a matrix in its I/O tiles (reads_in_chunks);
            # a GPU gets a tile's codes in one transfer.
            on_cpu = stored.device.type == "cpu"
            step = max(1, FP8_READ_ELEMENTS // max(cols, 1)) if on_cpu else stop - start
            for low in range(start, stop, step):
                high = min(stop, low + step)
                first, last = scale_rows_for(low, high, self.block[0])
                codes = stored.rows(self.codes, low, high, "fp8_codes")
                scales = stored.rows(self.scales, first, last, "fp8_scales")
                self._decode(stored, codes, scales, low, high, out[low - start : high - start])
            return
        first, last = scale_rows_for(start, stop, self.block[0])
        codes = stored.rows(self.codes, expert, expert + 1, "fp8_codes")[0, start:stop]
        scales = stored.rows(self.scales, expert, expert + 1, "fp8_scales")[0, first:last]
        self._decode(stored, codes, scales, start, stop, out)

    def check_kept(self, stored: StoredRows) -> None:
        """Every scale finite, read ``FP8_READ_ELEMENTS`` scales (or one row) at a time."""
        rows = self.scales.shape[0] if self.scales.shape else 1
        row_elements = max(1, math.prod(self.scales.shape[1:]))
        step = max(1, FP8_READ_ELEMENTS // row_elements)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            self._check_scales(stored.rows(self.scales, start, stop, "fp8_scales").float())

    def _check_scales(self, scales: torch.Tensor) -> None:
        if not bool(torch.isfinite(scales).all()):
            raise InvalidInputError(
                f"BASE tensor {self.scales.name!r} holds NaN or Inf scales: the FP8 checkpoint "
                "is corrupt (re-download it)"
            )

    def _decode(
        self,
        stored: StoredRows,
        codes: torch.Tensor,
        scales: torch.Tensor,
        start: int,
        stop: int,
        out: torch.Tensor,
    ) -> None:
        """Rows ``start:stop`` of one matrix from their codes and the scale rows covering
        them, the scales checked first."""
        first, last = scale_rows_for(start, stop, self.block[0])
        scales = scales.reshape(last - first, -1).float()
        self._check_scales(scales)
        codes = codes.reshape(stop - start, self.shape[-1])
        dequantize_fp8_blocks(codes, scales, self.block, start, self.dtype, out, stored.workspace)


class Fp8BlockFormat:
    """Block-wise FP8, as transformers' fine-grained FP8 integration and DeepSeek store it."""

    name = "fp8"
    quant_methods = ("fp8",)

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        return True

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        block = _block_size(quantization_config)
        weights: dict[str, QuantizedWeight] = {}
        for name in entries:
            if name.endswith(SCALE_SUFFIX):
                weight = fp8_weight(
                    name.removesuffix(SCALE_SUFFIX), name, entries, block, model_dtype
                )
                weights[weight.name] = weight
        for name, entry in entries.items():
            if entry.dtype.torch in FP8_DTYPES and name not in weights:
                raise InvalidInputError(
                    f"BASE tensor {name!r} is {entry.dtype} but has no scale tensor "
                    f"{_scale_name(name)!r}; the FP8 checkpoint is incomplete (re-download it)"
                )
        return weights

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        """e.g. ``fp8 e4m3 (128x128 blocks)``."""
        block = quantization_config.get("weight_block_size")
        fp8 = [w for w in weights.values() if isinstance(w, Fp8Weight)]
        kind = "e5m2" if fp8 and fp8[0].codes.dtype.torch == torch.float8_e5m2 else "e4m3"
        if isinstance(block, list) and len(block) == 2:
            return f"fp8 {kind} ({block[0]}x{block[1]} blocks)"
        return f"fp8 {kind} (one scale per tensor)"

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """None: every weight the format quantized is written in the dtype it dequantizes
        to, and every tensor it left unquantized as it is stored (see the protocol)."""
        return None

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        """The codes (a byte per weight) of a tile, or on the CPU of one run of
        ``FP8_READ_ELEMENTS`` of a read of any size (one row where a row is wider; see
        :meth:`Fp8Weight.reads_in_chunks`), and
        the scales that cover them: ``rows + 2`` for a scale per row, at most
        ``(rows / 16 + 2) * (cols / 16 + 1)`` with blocks of at least 16 a side, under
        ``max(run, tile_elements) + 2`` float32 either way; one chunk (or one row) of int32
        indices and float32 values; the value tables (1 KiB one code at a time, 512 KiB two
        at a time); off the CPU, the rows themselves."""
        codes = max(FP8_READ_ELEMENTS, tile_elements)
        scales = 4 * (codes + 2)
        chunk = 8 * max(FP8_CHUNK_ELEMENTS, tile_elements)
        held = codes + scales + chunk + 1024 + 8 * 2**16
        if device.type != "cpu":
            held += 4 * tile_elements
        return held

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        """Block-wise FP8 again, with the base's block size and scale format.

        Raises:
            InvalidInputError: one scale per tensor (the config has no
                ``weight_block_size``): its scale needs the whole merged weight before
                the first row can be written.
        """
        assert isinstance(weight, Fp8Weight)
        if _block_size(quantization_config) is None:
            raise InvalidInputError(
                "--save-method merged_native re-quantizes FP8 block by block; this base has one "
                "scale per tensor (no weight_block_size), which needs the whole merged weight "
                "at once: use merged_16bit"
            )
        return Fp8BlockNative(
            shape=weight.shape,
            dtype=weight.dtype,
            block=weight.block,
            scale_name=weight.scales.name,
            power_of_two_scales=quantization_config.get("scale_fmt") == "ue8m0",
        )


FP8_BLOCK = Fp8BlockFormat()


def _scale_name(weight_name: str) -> str:
    return f"{weight_name}{SCALE_SUFFIX}"


def _block_size(quantization_config: Mapping[str, object]) -> tuple[int, int] | None:
    """``weight_block_size`` as ``(bm, bn)``, or None (one scale per tensor)."""
    block = quantization_config.get("weight_block_size")
    if block is None:
        return None
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)
        or min(block) < MIN_BLOCK_SIDE
    ):
        raise InvalidInputError(
            f"config.json quantization_config.weight_block_size is {block!r}, not two block "
            f"sides of at least {MIN_BLOCK_SIDE} (e.g. [128, 128]); the FP8 config is corrupt"
        )
    return block[0], block[1]


def fp8_weight(
    name: str,
    scale_name: str,
    entries: Mapping[str, TensorEntry],
    block: tuple[int, int] | None,
    dtype: torch.dtype,
    extra: tuple[TensorEntry, ...] = (),
) -> Fp8Weight:
    """The FP8 weight ``name`` whose scales are ``scale_name``, checked against them.

    Args:
        name / scale_name: the stored codes and scales.
        entries: the stored tensors.
        block: ``(bm, bn)``; None for one scale per tensor.
        dtype: the dtype it dequantizes to.
        extra: other stored tensors that belong with it (see :class:`Fp8Weight`).

    Raises:
        InvalidInputError: the codes are missing or not FP8, or the scales do not fit.
    """
    codes = entries.get(name)
    scales = entries[scale_name]
    if codes is None:
        raise InvalidInputError(
            f"BASE has the FP8 scales {scale_name!r} but no {name!r}; the checkpoint is incomplete"
        )
    if codes.dtype.torch not in FP8_DTYPES or len(codes.shape) < 2:
        raise InvalidInputError(
            f"BASE tensor {name!r} has FP8 scales {scale_name!r} but is {codes.dtype} "
            f"{codes.shape}, not an FP8 matrix; the checkpoint is inconsistent"
        )
    rows, cols = codes.shape[-2:]
    block = block or (rows, cols)
    grid = (*codes.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    # One scale for a whole matrix may be stored as (), (1,) or (1, 1).
    per_tensor = len(codes.shape) == 2 and math.prod(scales.shape) == 1 and block == (rows, cols)
    if scales.dtype.torch not in SCALE_DTYPES or (scales.shape != grid and not per_tensor):
        raise InvalidInputError(
            f"BASE tensor {scale_name!r} is {scales.dtype} {scales.shape}, but {name!r} "
            f"{codes.shape} in blocks of {block[0]}x{block[1]} needs float {grid}: the "
            "scales do not fit the block size (config.json quantization_config); the "
            "checkpoint is inconsistent"
        )
    return Fp8Weight(name, codes.shape, dtype, block, codes, scales, extra)
