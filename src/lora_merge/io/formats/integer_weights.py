"""What the integer formats (compressed-tensors INT, GPTQ, AWQ) share: checks and refusals.

Their arithmetic lives in :mod:`lora_merge.compute.integer_dequantize`; each
format module says how its tensors are laid out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lora_merge.compute.integer_dequantize import (
    AWQ_PACK_ORDER,
    AWQ_UNPACK_ORDER,
    dequantize_codes,
    four_bit_codes,
    unpack_codes,
)
from lora_merge.errors import InvalidInputError
from lora_merge.io.formats.protocol import StoredRows
from lora_merge.io.safetensors_format import TensorEntry

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_finite_scales(scales: torch.Tensor, name: str, method: str) -> None:
    """Refuse NaN or Inf among scales just read (a dequantized weight would carry them).

    Raises:
        InvalidInputError: names the tensor.
    """
    if not bool(torch.isfinite(scales).all()):
        raise InvalidInputError(
            f"BASE tensor {name!r} holds NaN or Inf scales: the {method} checkpoint is "
            "corrupt (re-download it)"
        )


def refuse_native_integer(method: str) -> InvalidInputError:
    """Why ``--save-method merged_native`` is refused for an integer base, and what to do."""
    return InvalidInputError(
        f"--save-method merged_native cannot write this {method} base back: re-quantizing "
        "INT4/INT8 weights well needs calibration data (GPTQ/AWQ-style error correction), "
        "which a merge does not have. Merge to 16-bit (the default, merged_16bit) and "
        "quantize that output with llm-compressor (W4A16/W8A16 recipes)"
    )


def bad_scales(name: str, shape: tuple[int, ...], expected: str, method: str) -> InvalidInputError:
    """A scale (or zero-point) tensor whose shape does not fit its weight and group size."""
    return InvalidInputError(
        f"BASE tensor {name!r} has shape {shape}, but its weight needs {expected}: the "
        f"scales do not fit the group size (config.json quantization_config); the {method} "
        "checkpoint is inconsistent"
    )


def missing_part(name: str, weight: str, method: str) -> InvalidInputError:
    """A quantized weight without one of its tensors."""
    return InvalidInputError(
        f"BASE has the {method} weight {weight!r} but no {name!r}; the checkpoint is "
        "incomplete (re-download it)"
    )


# Weights decoded at once into a thread's band of rows (GPTQ/AWQ): 2M, 4 MiB of float16. A
# band is read once for the several tiles it serves.
BAND_ELEMENTS = 2**21
# Codes unpacked and scaled at once within a band (float32 values, their uint8 codes and,
# with desc_act, a float32 scale and zero per value).
VALUES_CHUNK = 2**18
# AWQ: the packed words of this many bands' output columns (1 MiB a band of 4-bit codes)
# are read once, from whole rows of ``qweight``, and kept for the bands that follow. A
# band's words are a few hundred bytes of each row, well under a read call's worth
# (``BYTES_PER_READ_CALL``), so every read takes whole rows: each band reading its own
# copied a weight's packed bytes from the page cache once per band (8 to 29 times at
# Llama-3-8B's widths, about 0.2-0.3 CPU-s in a 1-layer run).
AWQ_PACKED_BANDS = 4
# Bytes of whole ``qweight`` rows read at once while the packed words are gathered.
AWQ_ROWS_READ_BYTES = 2**20
# Smallest group accepted: it bounds a band's scales and zero points to 1/16 of its values
# (releases use 32, 64, 128 or a whole row).
MIN_GROUP_SIZE = 16


@dataclass(frozen=True)
class ColumnPackedWeight:
    """A GPTQ or AWQ weight: stored transposed, ``(in, out)``, its codes packed into int32.

    A row of the weight (an output feature) is a column of ``qweight``, so rows are
    decoded a band at a time: the band's columns of every packed row are read
    (:meth:`StoredRows.row_bytes`, only the band's bytes), unpacked, scaled and
    transposed into the thread's band buffer, which then serves each tile inside it.

    Attributes:
        name: the logical name (``X.weight``).
        shape: ``(out, in)``.
        dtype: the scales' dtype (float16 in every release), which the decoders return.
        method: ``GPTQ`` or ``AWQ``, for messages.
        bits: code width.
        group_size: input features per group.
        qweight: int32 codes; GPTQ ``(in * bits / 32, out)`` packed down the columns,
            AWQ ``(in, out / 8)`` packed along the rows in AWQ's order.
        qzeros: int32 zero points ``(groups, out * bits / 32)``, packed as ``qweight``'s rows.
        scales: ``(groups, out)``.
        g_idx: GPTQ's group of each input feature (desc_act), or None.
        zero_offset: added to each stored zero point (1 for AutoGPTQ's v1 checkpoints).
        awq_order: whether words hold columns in AWQ's interleaved order.
    """

    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    method: str
    bits: int
    group_size: int
    qweight: TensorEntry
    qzeros: TensorEntry
    scales: TensorEntry
    g_idx: TensorEntry | None
    zero_offset: int
    awq_order: bool

    @property
    def stored_names(self) -> list[str]:
        parts = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return [p.name for p in parts if p is not None]

    @property
    def anchor(self) -> str:
        return self.qweight.name

    @property
    def reads_in_chunks(self) -> bool:
        """False: a read's workspace grows with its rows (see the protocol)."""
        return False

    @property
    def _align(self) -> int:
        """Rows a band starts on: whole int32 words of zero points (and AWQ's codes)."""
        return 8 if self.awq_order else 32 // self.bits

    def check_kept(self, stored: StoredRows) -> None:
        """Never called: ``merged_native`` refuses integer bases, so no weight is kept."""
        return None

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as the format's reference decoder gives them."""
        inputs = self.shape[1]
        band, first = self._band(stored, start, stop)
        out = stored.output((stop - start) * inputs, self.dtype)
        if out is None:
            out = torch.empty((stop - start) * inputs, dtype=self.dtype, device=stored.device)
        out = out.view(stop - start, inputs)
        if not self.awq_order:
            return out.copy_(band[start - first : stop - first])
        # An AWQ band is decoded in the words' column order (see _decode_band): row 8k + m
        # of the weight is band row 8k + AWQ_UNPACK_ORDER[m].
        wanted = torch.arange(start - first, stop - first, device=band.device)
        order = torch.tensor(AWQ_UNPACK_ORDER, device=band.device)
        packed_rows = wanted - wanted % 8 + order[wanted % 8]
        return torch.index_select(band, 0, packed_rows, out=out)

    def _band(self, stored: StoredRows, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """The thread's decoded band that holds rows ``start:stop``, and its first row."""
        key = f"{self.method}:band"
        held = stored.memo.get(key)
        if (
            isinstance(held, tuple)
            and held[0] == self.name
            and held[2] <= start
            and stop <= held[3]
        ):
            return held[1], held[2]
        outputs, inputs = self.shape
        align = self._align
        first = start - start % align
        rows = max(align, BAND_ELEMENTS // inputs // align * align)
        last = min(outputs, max(stop, first + rows))
        last = min(outputs, -(-last // align) * align)  # whole words (AWQ's outputs are too)
        band = stored.workspace.buffer(f"{self.method}_band", (last - first) * inputs, self.dtype)
        band = band.view(last - first, inputs)
        self._decode_band(stored, first, last, band)
        stored.memo[key] = (self.name, band, first, last)
        return band, first

    def _decode_band(self, stored: StoredRows, first: int, last: int, band: torch.Tensor) -> None:
        """Rows ``first:last`` (``first`` aligned) of the weight into ``band``."""
        inputs = self.shape[1]
        groups = self.scales.shape[0]
        count = last - first
        scale_size = self.scales.dtype.itemsize
        scales = stored.row_bytes(
            self.scales, 0, groups, first * scale_size, last * scale_size, f"{self.method}_scales"
        )
        scales = scales.contiguous().view(self.scales.dtype.torch).t()  # (count, groups)
        if self.awq_order:
            # Decode in the words' column order, which spares a gather of every chunk's codes:
            # band row 8k + i is output 8k + AWQ_PACK_ORDER[i] (read_rows puts rows back).
            order = torch.tensor(AWQ_PACK_ORDER, device=scales.device)
            in_words = torch.arange(count, device=scales.device)
            scales = scales.index_select(0, in_words - in_words % 8 + order[in_words % 8])
        check_finite_scales(scales, self.scales.name, self.method)
        zeros = self._codes(stored, self.qzeros, 0, groups, first, last, f"{self.method}_zeros")
        zeros = zeros.to(torch.int32).add_(self.zero_offset).t()  # (count, groups)
        column_groups = self._column_groups(stored)
        per_row = 1 if self.awq_order else 32 // self.bits  # input features per qweight row
        # A chunk holds whole groups (and whole packed rows), so that it starts a group.
        step = self.group_size * per_row // math.gcd(self.group_size, per_row)
        chunk = max(step, VALUES_CHUNK // max(count, 1) // step * step)
        for begin in range(0, inputs, chunk):
            end = min(inputs, begin + chunk)
            codes = self._transposed_codes(
                stored, begin // per_row, end // per_row, first, last
            )  # (count, end - begin)
            if column_groups is None and (end - begin) % self.group_size == 0:
                # In order: the chunk's groups are consecutive, from the group of `begin`.
                g0, g1 = begin // self.group_size, -(-end // self.group_size)
                dequantize_codes(
                    codes,
                    scales[:, g0:g1],
                    zeros[:, g0:g1],
                    self.group_size,
                    self.dtype,
                    out=band[:, begin:end],
                )
            else:
                groups_here = (
                    column_groups[begin:end]
                    if column_groups is not None
                    else torch.arange(begin, end, device=stored.device) // self.group_size
                )
                dequantize_codes(
                    codes,
                    scales,
                    zeros,
                    1,
                    self.dtype,
                    column_groups=groups_here,
                    out=band[:, begin:end],
                )

    def _codes(
        self,
        stored: StoredRows,
        entry: TensorEntry,
        start: int,
        stop: int,
        first: int,
        last: int,
        buffer_name: str,
    ) -> torch.Tensor:
        """Unsigned codes of output columns ``first:last`` of rows ``start:stop`` of a tensor
        packed along its rows (``qzeros``, AWQ's ``qweight``), ``(rows, last - first)``."""
        per_word = 8 if self.awq_order else 32 // self.bits
        w0, w1 = first // per_word, -(-last // per_word)
        if entry is self.qweight:
            words = self._packed_words(stored, w0, w1)[start:stop].contiguous()
        else:
            words = stored.row_bytes(entry, start, stop, 4 * w0, 4 * w1, buffer_name)
            words = words.contiguous().view(torch.int32)
        # AWQ codes stay in the words' order (a band starts and ends on whole words).
        codes = unpack_codes(words, self.bits)
        return codes[:, first - w0 * per_word : last - w0 * per_word]

    def _packed_words(self, stored: StoredRows, w0: int, w1: int) -> torch.Tensor:
        """Words ``w0:w1`` of every row of AWQ's ``qweight`` (the output columns of a band),
        ``(in, w1 - w0)`` int32: from the thread's words of :data:`AWQ_PACKED_BANDS` bands,
        read once from whole rows for the bands that follow (see there)."""
        key = f"{self.method}:packed_words"
        held = stored.memo.get(key)
        if not (
            isinstance(held, tuple) and held[0] == self.name and held[1] <= w0 and w1 <= held[2]
        ):
            rows, row_words = self.qweight.shape[0], self.qweight.shape[1]
            last = min(row_words, w0 + AWQ_PACKED_BANDS * (w1 - w0))
            words = stored.workspace.buffer(
                f"{self.method}_packed_words", rows * (last - w0), torch.int32
            ).view(rows, last - w0)
            step = max(1, AWQ_ROWS_READ_BYTES // self.qweight.row_nbytes)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                band = stored.row_bytes(
                    self.qweight, start, stop, 4 * w0, 4 * last, f"{self.method}_codes"
                )
                words[start:stop].view(torch.uint8).view(stop - start, -1).copy_(band)
            held = (self.name, w0, last, words)
            stored.memo[key] = held
        words = held[3]
        assert isinstance(words, torch.Tensor)
        return words[:, w0 - held[1] : w1 - held[1]]

    def _transposed_codes(
        self, stored: StoredRows, start: int, stop: int, first: int, last: int
    ) -> torch.Tensor:
        """The codes of ``qweight`` rows ``start:stop``, output columns ``first:last``, as a
        contiguous ``(last - first, input features)`` block: transposed while they are
        packed, so that the float32 arithmetic runs on contiguous rows. GPTQ's 4-bit codes
        come as float32 (unpacked by lookups), others as uint8."""
        if self.awq_order:
            return (
                self._codes(stored, self.qweight, start, stop, first, last, f"{self.method}_codes")
                .t()
                .contiguous()
            )
        words = stored.row_bytes(
            self.qweight, start, stop, 4 * first, 4 * last, f"{self.method}_codes"
        )
        words = words.contiguous().view(torch.int32)  # (packed rows, count)
        per_word = 32 // self.bits
        if self.bits == 4:
            # Words transposed (4 bytes for 8 codes), then unpacked along the rows.
            count = last - first
            transposed = stored.workspace.buffer(
                f"{self.method}_words", count * (stop - start), torch.int32
            ).view(count, stop - start)
            transposed.copy_(words.t())
            values = stored.workspace.buffer(
                f"{self.method}_values", count * (stop - start) * per_word, torch.float32
            )
            return four_bit_codes(
                transposed,
                values.view(count, (stop - start) * per_word),
                stored.workspace.buffer(
                    f"{self.method}_indices", count * (stop - start) * 4, torch.int32
                ),
            )
        codes = unpack_codes(words, self.bits).view(stop - start, last - first, per_word)
        # Input feature p * per_word + k of output column j: codes[p, j, k].
        return codes.permute(1, 0, 2).reshape(last - first, (stop - start) * per_word)

    def _column_groups(self, stored: StoredRows) -> torch.Tensor | None:
        """``g_idx`` as indices, read once per thread; None where it is absent or in order
        (``i // group_size``, what AutoGPTQ writes without desc_act)."""
        if self.g_idx is None:
            return None
        key = f"{self.method}:g_idx:{self.name}"
        if key not in stored.memo:
            inputs = self.shape[1]
            g_idx = stored.rows(self.g_idx, 0, inputs, f"{self.method}_g_idx").long().clone()
            groups = self.scales.shape[0]
            if bool((g_idx < 0).any()) or bool((g_idx >= groups).any()):
                raise InvalidInputError(
                    f"BASE tensor {self.g_idx.name!r} names groups outside 0..{groups - 1} (the "
                    f"rows of {self.scales.name!r}); the {self.method} checkpoint is corrupt"
                )
            in_order = torch.arange(inputs, device=g_idx.device) // self.group_size
            stored.memo[key] = None if torch.equal(g_idx, in_order) else g_idx
        value = stored.memo[key]
        return value if isinstance(value, torch.Tensor) else None


def column_packed_workspace_bound(tile_elements: int, device: torch.device) -> int:
    """What a thread holds for a GPTQ/AWQ band: the band (float32 at most, at least a tile),
    its scales and zero points (a group has at least :data:`MIN_GROUP_SIZE` values; as
    read, as int32 and float32), and one chunk's codes, float32 values and per-value scales
    and zeros; GPTQ's 4-bit codes are unpacked by lookups, with an int32 index per byte and
    the chunk's words transposed; AWQ's packed words of the bands that follow; off the
    CPU, the rows handed out."""
    band = max(BAND_ELEMENTS, tile_elements) + tile_elements
    held = 4 * band + band // MIN_GROUP_SIZE * (4 + 4 + 4 + 4)
    # AWQ's packed words of AWQ_PACKED_BANDS bands (4-bit codes: half a byte a weight) and
    # the whole rows they are read from.
    held += AWQ_PACKED_BANDS * band // 2 + AWQ_ROWS_READ_BYTES
    held += VALUES_CHUNK * (4 + 1 + 4 + 8) + 4 * VALUES_CHUNK  # + the packed words
    held += VALUES_CHUNK * (2 + 1)  # the lookups' indices, the transposed words
    if device.type != "cpu":
        held += 4 * tile_elements
    return held
