"""A base reader that hands out quantized weights dequantized, a row range at a time.

It is a :class:`~lora_merge.io.reader.TensorSource` over the base's *logical*
tensors (see :mod:`lora_merge.io.formats.registry`): stored tensors pass through
to the :class:`~lora_merge.io.reader.SafetensorsReader`; a quantized weight's
rows are decoded by the weight itself
(:meth:`~lora_merge.io.formats.protocol.QuantizedWeight.read_rows`), which reads
only the codes and scales that cover them, so the stream merges them exactly as
it merges a 16-bit base and memory stays bounded by the tile size whatever the
tensor size.

Each thread that reads gets its own :class:`ThreadReads` (the
:class:`~lora_merge.io.formats.protocol.StoredRows` a format reads with) and
:class:`~lora_merge.compute.dequantize.DequantizeWorkspace`: the codes, the
scales and the float32 intermediate values of a tile land in buffers reused
from tile to tile, and with the caller's ``buffer`` (the stream passes its tile
buffer) the dequantized rows are written into it, so a CPU tile allocates
nothing. Each format bounds what its reads hold
(:meth:`~lora_merge.io.formats.protocol.QuantizationFormat.workspace_bound`;
:func:`dequantize_workspace_bound` is the largest).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Literal

import torch

from lora_merge.compute.dequantize import DequantizeWorkspace
from lora_merge.dtypes import DType
from lora_merge.io.formats.protocol import SubrowWeight
from lora_merge.io.formats.registry import LogicalTensor
from lora_merge.io.formats.registry import dequantize_workspace_bound as dequantize_workspace_bound
from lora_merge.io.positional import PositionalFile
from lora_merge.io.reader import StoredTensorSource, checked_row_range
from lora_merge.io.safetensors_format import TensorEntry

DequantizeBackend = Literal["auto", "bitsandbytes", "torch"]


class ThreadReads:
    """One thread's :class:`~lora_merge.io.formats.protocol.StoredRows`: reads of the
    stored tensors into its workspace, and where the dequantized rows go.

    Args:
        stored: reader of every stored tensor of the base.
        device: where dequantization runs.
        use_library_kernels: the format library's kernels were asked for.
    """

    def __init__(
        self, stored: StoredTensorSource, device: torch.device, use_library_kernels: bool
    ) -> None:
        self._stored = stored
        self.device = device
        self.use_library_kernels = use_library_kernels
        self.workspace = DequantizeWorkspace(device)
        self.memo: dict[str, object] = {}
        # The caller's tile buffer for the read in progress (see DequantizingReader.read_rows).
        self.buffer: torch.Tensor | None = None

    def rows(self, entry: TensorEntry, start: int, stop: int, buffer_name: str) -> torch.Tensor:
        """Rows ``start:stop`` of a stored tensor, read into the workspace's buffer
        ``buffer_name`` (on the CPU) and moved to the device."""
        nbytes = (stop - start) * entry.row_nbytes
        on_cpu = self.device.type == "cpu"
        into = self.workspace.buffer(buffer_name, nbytes, torch.uint8) if on_cpu else None
        return self._to_device(self._stored.read_rows(entry.name, start, stop, into))

    def row_bytes(
        self, entry: TensorEntry, start: int, stop: int, first: int, last: int, buffer_name: str
    ) -> torch.Tensor:
        """Bytes ``first:last`` of each of rows ``start:stop`` of a stored tensor, as uint8
        ``(stop - start, last - first)`` (see :meth:`EntryReader.read_row_bytes`)."""
        nbytes = (stop - start) * entry.row_nbytes  # at most: whole rows when the band is wide
        on_cpu = self.device.type == "cpu"
        into = self.workspace.buffer(buffer_name, nbytes, torch.uint8) if on_cpu else None
        band = self._stored.read_row_bytes(entry.name, start, stop, first, last, into)
        return self._to_device(band.contiguous() if not on_cpu else band)

    def byte_range(
        self, entry: TensorEntry, first: int, last: int, buffer_name: str
    ) -> torch.Tensor:
        """Bytes ``first:last`` of a stored tensor of any dtype (bnb_4bit_quant_storage)."""
        row_bytes = entry.row_nbytes
        first_row, last_row = first // row_bytes, -(-last // row_bytes)
        rows = self.rows(entry, first_row, last_row, buffer_name)
        raw = rows.reshape(-1).view(torch.uint8) if rows.dtype != torch.uint8 else rows.reshape(-1)
        offset = first - first_row * row_bytes
        return raw[offset : offset + last - first]

    def output(self, count: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Where ``count`` dequantized values go: the caller's buffer when it holds them,
        else the workspace when there is a buffer at all (the caller reuses results), else
        None (fresh memory)."""
        buffer = self.buffer
        if buffer is None:
            return None
        nbytes = count * dtype.itemsize
        if self.device.type == "cpu" and buffer.dtype == torch.uint8 and buffer.numel() >= nbytes:
            return buffer.reshape(-1)[:nbytes].view(dtype)
        return self.workspace.buffer("out", count, dtype)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move freshly read bytes to the device: on CUDA via pinned memory, without blocking
        (the copy overlaps the next read; torch orders it before the kernels that use it)."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)


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
        self._use_library_kernels = backend == "bitsandbytes"
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

    def dtype(self, key: str) -> DType:
        return self._tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def entry(self, key: str) -> TensorEntry:
        """The file location of a stored (never a quantized) tensor."""
        return self._stored.entry(key)

    def prefetch(self, key: str) -> None:
        """Have the disk read a tensor ahead (see :meth:`SafetensorsReader.prefetch`); for a
        quantized weight, its codes and scales. ``key`` may also name a stored tensor
        (``merged_native`` copies an untouched weight's stored tensors)."""
        logical = self._tensors.get(key)
        quantized = None if logical is None else logical.quantized
        if quantized is None:
            self._stored.prefetch(key)
            return
        for name in quantized.stored_names:
            self._stored.prefetch(name)

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int:
        """Copy a stored tensor's bytes (see :meth:`SafetensorsReader.copy_bytes`)."""
        return self._stored.copy_bytes(key, destination, destination_offset)

    def read_row_bytes(
        self, key: str, start: int, stop: int, first: int, last: int, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """A band of a stored tensor's bytes (see :meth:`EntryReader.read_row_bytes`)."""
        return self._stored.read_row_bytes(key, start, stop, first, last, buffer)

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
        reads = self._reads()
        reads.buffer = buffer
        try:
            return quantized.read_rows(reads, start, stop)
        finally:
            reads.buffer = None

    def check_kept(self, keys: Iterable[str]) -> None:
        """Check the scales of the quantized weights ``keys`` that the output keeps as
        stored (see :meth:`QuantizedWeight.check_kept`), reading their scales only.

        Raises:
            InvalidInputError: a weight's scales are corrupt; names the tensor.
        """
        for key in keys:
            quantized = self._tensors[key].quantized
            if quantized is not None:
                quantized.check_kept(self._reads())

    def read_subrows(
        self,
        key: str,
        row: int,
        start: int,
        stop: int,
        buffer: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``tensor[row, start:stop]`` of a logical tensor of 3 or more dimensions (see
        :class:`~lora_merge.io.reader.SubrowSource`); ``buffer`` as in :meth:`read_rows`. A
        quantized weight that cannot decode part of a row decodes the row and slices it."""
        quantized = self._tensors[key].quantized
        if quantized is None:
            return self._stored.read_subrows(key, row, start, stop, buffer, compute_dtype)
        if not isinstance(quantized, SubrowWeight):
            return self.read_rows(key, row, row + 1, buffer)[0, start:stop]
        checked_row_range(key, quantized.shape[0], row, row + 1)
        stop = checked_row_range(f"{key}[{row}]", quantized.shape[1], start, stop)
        if start == stop or 0 in quantized.shape:
            return torch.empty((stop - start, *quantized.shape[2:]), dtype=quantized.dtype)
        reads = self._reads()
        reads.buffer = buffer
        try:
            return quantized.read_subrows(reads, row, start, stop, compute_dtype)
        finally:
            reads.buffer = None

    def workspace_nbytes(self) -> int:
        """Bytes held by the calling thread's workspace (0 before its first read)."""
        reads: ThreadReads | None = getattr(self._per_thread, "reads", None)
        return 0 if reads is None else reads.workspace.nbytes

    def _reads(self) -> ThreadReads:
        """The calling thread's reads, made on its first read."""
        reads: ThreadReads | None = getattr(self._per_thread, "reads", None)
        if reads is None:
            reads = ThreadReads(self._stored, self._device, self._use_library_kernels)
            self._per_thread.reads = reads
        return reads
