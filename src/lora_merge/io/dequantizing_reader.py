"""A base reader that hands out bitsandbytes-quantized weights dequantized, a row range at a time.

It is a :class:`~lora_merge.io.reader.TensorSource` over the base's *logical*
tensors (see :mod:`lora_merge.io.bitsandbytes_format`): stored tensors pass through
to the :class:`~lora_merge.io.reader.SafetensorsReader`; a quantized weight's
rows are read as the codes and scales that cover them and dequantized, so the
stream merges them exactly as it merges a 16-bit base and memory stays bounded
by the tile size whatever the tensor size.

A row range rarely starts on a quantization block, so the run of elements read
is widened to whole blocks, dequantized, and trimmed: every element depends
only on its own code and its block's scale, so the result has the bits a
whole-tensor dequantization gives.

Each thread that reads gets its own
:class:`~lora_merge.compute.dequantize.DequantizeWorkspace`: the codes, the
scales and the float32 intermediate values of a tile land in buffers reused
from tile to tile, and with the caller's ``buffer`` (the stream passes its tile
buffer) the dequantized rows are written into it, so a CPU tile allocates
nothing. A thread's workspace holds the packed codes of its largest tile (half
a byte per weight), 1.5 MiB of intermediate values
(:data:`~lora_merge.compute.dequantize.DEQUANTIZE_CHUNK_ELEMENTS`), a window of
block scales (:data:`ABSMAX_WINDOW_BLOCKS`, under 1 MiB) and, where the
caller's buffer cannot take the rows (a GPU), the rows themselves.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Literal

import torch

from lora_merge.compute import bitsandbytes_backend
from lora_merge.compute.dequantize import (
    DEQUANTIZE_CHUNK_ELEMENTS,
    FOUR_BIT_BLOCKSIZES,
    DequantizeWorkspace,
    dequantize_4bit,
    dequantize_int8_rows,
    dequantize_nested_absmax,
)
from lora_merge.io.bitsandbytes_format import FourBitWeight, Int8Weight, LogicalTensor
from lora_merge.io.positional import PositionalFile
from lora_merge.io.reader import StoredTensorSource, checked_row_range
from lora_merge.io.safetensors_format import TensorEntry

DequantizeBackend = Literal["auto", "bitsandbytes", "torch"]
# Block scales a thread reads (and dequantizes) at once: 256 KiB of float32, the scales
# of 4M weights at blocksize 64, so one read serves ~30 CPU tiles.
ABSMAX_WINDOW_BLOCKS = 2**16
# Absmax values per nested block in bitsandbytes' double quantization (a window is rounded
# out to whole nested blocks) and the bytes a window holds per block: the uint8 codes, their
# int32 indices, the float32 scales (plus 4/256 for the nested scales, and the 1 KiB map).
_NESTED_BLOCKSIZE = 256
_WINDOW_BYTES_PER_BLOCK = 1 + 4 + 4 + 1


def dequantize_workspace_bound(tile_elements: int, device: torch.device) -> int:
    """The most bytes one thread's workspace holds when no tile has more than
    ``tile_elements`` weights (``working_memory_bound`` counts it once per thread).

    A tile is widened to whole blocks on each side; its packed codes (or its int8
    codes and row scales) are read whole; the values go through one chunk of
    indices and float32 values at a time; the block scales are one window; and off
    the CPU the dequantized rows themselves (float32 at most) stay in the workspace.
    """
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


class DequantizingReader:
    """Logical tensors of a base, quantized weights dequantized on ``device``.

    Args:
        stored: reader of every stored tensor of the base (codes and scales included).
        tensors: the base's logical tensors (``BaseCheckpoint.tensors``).
        device: where dequantization runs; rows of quantized weights come back there.
        backend: ``auto`` or ``torch``: lora-merge's own kernels
            (:mod:`lora_merge.compute.dequantize`), the same bits on every device;
            ``bitsandbytes``: its kernels where they load and run, else torch (for
            tests and benchmarks). On the CPU the torch path is the faster whole, and
            never importing bitsandbytes keeps 2 s and 120 MB out of a merge; on a GPU
            bitsandbytes' kernel writes FP4's zero code as -0.0, the format and its
            CPU kernel +0.0, so only one path can give the same bits on both.
    """

    def __init__(
        self,
        stored: StoredTensorSource,
        tensors: dict[str, LogicalTensor],
        device: torch.device | str = "cpu",
        backend: DequantizeBackend = "auto",
    ) -> None:
        self._stored = stored
        self._tensors = tensors
        self._device = torch.device(device)
        self._use_bitsandbytes = backend == "bitsandbytes"
        self._per_thread = threading.local()

    def __enter__(self) -> DequantizingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stored.close()

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def working_bytes(self, key: str) -> int:
        """Nothing beyond the tensor read: the dequantization workspace is the stream's."""
        return 0

    def held_bytes(self, workers: int) -> int:
        """Nothing: tensors are read when asked for, a tile at a time."""
        return 0

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def entry(self, key: str) -> TensorEntry:
        """The file location of a stored (never a quantized) tensor."""
        return self._stored.entry(key)

    def prefetch(self, key: str) -> None:
        """Have the disk read a tensor ahead (see :meth:`SafetensorsReader.prefetch`); for a
        quantized weight, its codes and scales."""
        quantized = self._tensors[key].quantized
        if quantized is None:
            self._stored.prefetch(key)
            return
        for name in quantized.stored_names:
            self._stored.prefetch(name)

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int:
        """Copy a stored tensor's bytes (see :meth:`SafetensorsReader.copy_bytes`)."""
        return self._stored.copy_bytes(key, destination, destination_offset)

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of a logical tensor; a quantized weight's rows dequantized.

        With ``buffer`` (uint8, on the CPU) the rows of a quantized weight are written
        into it where they fit, else into the calling thread's workspace: either way
        the result is valid until this thread's next call with a buffer. Without
        one they are in fresh memory.
        """
        quantized = self._tensors[key].quantized
        if quantized is None:
            return self._stored.read_rows(key, start, stop, buffer)
        stop = checked_row_range(key, quantized.shape[0], start, stop)
        if start == stop or 0 in quantized.shape:  # nothing to read
            return torch.empty((stop - start, *quantized.shape[1:]), dtype=quantized.dtype)
        if isinstance(quantized, Int8Weight):
            return self._int8_rows(quantized, start, stop, buffer)
        return self._four_bit_rows(quantized, start, stop, buffer)

    def workspace_nbytes(self) -> int:
        """Bytes held by the calling thread's workspace (0 before its first read)."""
        workspace: DequantizeWorkspace | None = getattr(self._per_thread, "workspace", None)
        return 0 if workspace is None else workspace.nbytes

    def _workspace(self) -> DequantizeWorkspace:
        """The calling thread's workspace, made on its first read."""
        workspace: DequantizeWorkspace | None = getattr(self._per_thread, "workspace", None)
        if workspace is None:
            workspace = DequantizeWorkspace(self._device)
            self._per_thread.workspace = workspace
        return workspace

    def _output(
        self, buffer: torch.Tensor | None, count: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Where ``count`` dequantized values go: ``buffer`` when it holds them, else the
        thread's workspace when there is a buffer at all (the caller reuses results), else
        None (fresh memory)."""
        if buffer is None:
            return None
        nbytes = count * dtype.itemsize
        if self._device.type == "cpu" and buffer.dtype == torch.uint8 and buffer.numel() >= nbytes:
            return buffer.reshape(-1)[:nbytes].view(dtype)
        return self._workspace().buffer("out", count, dtype)

    def _int8_rows(
        self, weight: Int8Weight, start: int, stop: int, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        workspace = self._workspace()
        codes = self._read(weight.weight, start, stop, workspace, "int8_codes")
        scales = self._read(weight.row_scales, start, stop, workspace, "int8_scales")
        if self._use_bitsandbytes:
            values = bitsandbytes_backend.dequantize_int8_with_bitsandbytes(codes, scales)
            if values is not None:
                return values
        out = self._output(buffer, codes.numel(), torch.float32)
        return dequantize_int8_rows(codes, scales, None if out is None else out.view(codes.shape))

    def _four_bit_rows(
        self, weight: FourBitWeight, start: int, stop: int, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        row_elements = math.prod(weight.shape[1:])
        first, last = start * row_elements, stop * row_elements
        # Widen to whole blocks: blocks start on even elements, so on whole bytes.
        block_first = first - first % weight.blocksize
        block_last = min(weight.numel, -(-last // weight.blocksize) * weight.blocksize)
        count = block_last - block_first
        workspace = self._workspace()
        packed = self._stored_bytes(weight.packed, block_first // 2, (block_last + 1) // 2)
        absmax = self._absmax(
            weight, block_first // weight.blocksize, -(-block_last // weight.blocksize)
        )
        values = None
        if self._use_bitsandbytes:
            values = bitsandbytes_backend.dequantize_4bit_with_bitsandbytes(
                packed, absmax, weight.quant_type, weight.blocksize, count, weight.dtype
            )
        if values is None:
            values = dequantize_4bit(
                packed,
                absmax,
                weight.quant_type,
                weight.blocksize,
                count,
                weight.dtype,
                out=self._output(buffer, count, weight.dtype),
                workspace=workspace,
            )
        trimmed = values[first - block_first : last - block_first]
        return trimmed.reshape(stop - start, *weight.shape[1:])

    def _absmax(self, weight: FourBitWeight, first: int, last: int) -> torch.Tensor:
        """Float32 absmax of blocks ``first:last``, from the thread's window of scales.

        A thread reads a weight's tiles in order, so the scales are read (and, when
        nested, dequantized) a window of :data:`ABSMAX_WINDOW_BLOCKS` at a time, not
        tile by tile: one read instead of three, and no per-tile overhead.
        """
        per_thread = self._per_thread
        window: tuple[str, int, int, torch.Tensor] | None = getattr(per_thread, "window", None)
        if window is None or window[0] != weight.name or not window[1] <= first < last <= window[2]:
            window_first, window_last, scales = self._absmax_window(weight, first, last)
            window = (weight.name, window_first, window_last, scales)
            per_thread.window = window
        return window[3][first - window[1] : last - window[1]]

    def _absmax_window(
        self, weight: FourBitWeight, first: int, last: int
    ) -> tuple[int, int, torch.Tensor]:
        """``(start, stop, scales)``: float32 absmax of blocks ``start:stop`` (covering
        ``first:last``), in the thread's workspace; nested ones dequantized."""
        workspace = self._workspace()
        nested = weight.nested
        blocks = weight.absmax.shape[0]
        if nested is None:
            stop = min(blocks, max(last, first + ABSMAX_WINDOW_BLOCKS))
            return first, stop, self._read(weight.absmax, first, stop, workspace, "absmax")
        block = nested.blocksize
        start = first - first % block
        stop = min(blocks, -(-max(last, start + ABSMAX_WINDOW_BLOCKS) // block) * block)
        codes = self._read(weight.absmax, start, stop, workspace, "absmax_codes")
        nested_scales = self._read(
            nested.nested_absmax, start // block, -(-stop // block), workspace, "nested_absmax"
        )
        code_rows = nested.nested_quant_map.shape[0]
        code = self._read(nested.nested_quant_map, 0, code_rows, workspace, "nested_code")
        absmax = None
        if self._use_bitsandbytes:
            absmax = bitsandbytes_backend.dequantize_nested_absmax_with_bitsandbytes(
                codes, nested_scales, code, block, nested.offset
            )
        if absmax is None:
            absmax = dequantize_nested_absmax(
                codes, nested_scales, code, block, nested.offset, workspace=workspace
            )
        return start, stop, absmax

    def _read(
        self,
        entry: TensorEntry,
        start: int,
        stop: int,
        workspace: DequantizeWorkspace,
        name: str,
    ) -> torch.Tensor:
        """Rows ``start:stop`` of a stored tensor, read into the workspace's buffer ``name``
        (on the CPU) and moved to the device."""
        nbytes = (stop - start) * entry.row_nbytes
        on_cpu = self._device.type == "cpu"
        into = workspace.buffer(name, nbytes, torch.uint8) if on_cpu else None
        return self._to_device(self._stored.read_rows(entry.name, start, stop, into))

    def _stored_bytes(self, entry: TensorEntry, first: int, last: int) -> torch.Tensor:
        """Bytes ``first:last`` of a stored tensor of any dtype (bnb_4bit_quant_storage)."""
        row_bytes = entry.row_nbytes
        first_row, last_row = first // row_bytes, -(-last // row_bytes)
        rows = self._read(entry, first_row, last_row, self._workspace(), "packed")
        raw = rows.reshape(-1).view(torch.uint8) if rows.dtype != torch.uint8 else rows.reshape(-1)
        offset = first - first_row * row_bytes
        return raw[offset : offset + last - first]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move freshly read bytes to the device: on CUDA via pinned memory, without blocking
        (the copy overlaps the next read; torch orders it before the kernels that use it)."""
        if self._device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self._device, non_blocking=True)
