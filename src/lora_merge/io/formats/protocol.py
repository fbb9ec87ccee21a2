"""What a quantization format module provides, and what it is given to read with.

A format (bitsandbytes, FP8 block-wise, MXFP4, compressed-tensors ...) is one
module under :mod:`lora_merge.io.formats` holding one object that satisfies
:class:`QuantizationFormat`, plus one row in the table
:func:`lora_merge.io.formats.registry.formats`. The rest of lora-merge sees only these
protocols:

- resolving BASE asks each format that :meth:`~QuantizationFormat.accepts` the
  ``quantization_config`` to :meth:`~QuantizationFormat.find_weights` among the
  stored tensors: each found :class:`QuantizedWeight` is one *logical* tensor
  (the name, shape and dtype the model sees) standing for several stored ones;
- the planner plans logical tensors as it plans a 16-bit base's;
- the :class:`~lora_merge.io.dequantizing_reader.DequantizingReader` asks a
  weight for rows ``start:stop`` (:meth:`QuantizedWeight.read_rows`), handing it
  a :class:`StoredRows` (one thread's reads and buffers); the weight reads only
  the codes and scales that cover those rows;
- the executor sizes each thread's workspace with
  :meth:`QuantizationFormat.workspace_bound`;
- ``--save-method merged_native`` asks :meth:`QuantizationFormat.native_target`
  how a merged weight is written back in the base's format (a
  :class:`NativeTarget`), or why it is not.

Nothing here reads files itself: a format is told where its tensors are
(:class:`~lora_merge.io.safetensors_format.TensorEntry`) and reads through
:class:`StoredRows`; its arithmetic lives in :mod:`lora_merge.compute`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch

from lora_merge.compute.dequantize import DequantizeWorkspace
from lora_merge.io.safetensors_format import TensorEntry
from lora_merge.io.shard_writer import ShardWriter, TensorSpec


class StoredRows(Protocol):
    """One thread's view of a base's stored tensors, for a format's dequantizer.

    Everything it returns lives in the thread's reusable buffers (or the
    caller's tile buffer): valid until the same thread asks again under the same
    buffer name.
    """

    @property
    def device(self) -> torch.device:
        """Where dequantization runs; tensors come back there."""
        ...

    @property
    def workspace(self) -> DequantizeWorkspace:
        """The thread's buffers for intermediate values (see :class:`DequantizeWorkspace`)."""
        ...

    @property
    def memo(self) -> dict[str, object]:
        """The thread's scratch dict for a format's caches (e.g. a window of block scales);
        key it by the format's name."""
        ...

    @property
    def use_library_kernels(self) -> bool:
        """The reader was asked for the format library's own kernels (tests, benchmarks)."""
        ...

    def rows(self, entry: TensorEntry, start: int, stop: int, buffer_name: str) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a stored tensor, in its stored dtype,
        read into the buffer ``buffer_name`` and moved to :attr:`device`."""
        ...

    def row_bytes(
        self, entry: TensorEntry, start: int, stop: int, first: int, last: int, buffer_name: str
    ) -> torch.Tensor:
        """Bytes ``first:last`` of each of rows ``start:stop`` of a stored tensor, uint8
        ``(stop - start, last - first)`` on :attr:`device` (a band of columns: GPTQ's and
        AWQ's ``qweight`` hold a weight's rows as columns), reading only the band where it
        is narrow."""
        ...

    def byte_range(
        self, entry: TensorEntry, first: int, last: int, buffer_name: str
    ) -> torch.Tensor:
        """Bytes ``first:last`` of a stored tensor of any dtype, as uint8 on :attr:`device`
        (read, whole rows, into the buffer ``buffer_name``)."""
        ...

    def output(self, count: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Where ``count`` dequantized values of ``dtype`` go (1-D): the caller's tile
        buffer or the thread's workspace, or None for fresh memory."""
        ...


class QuantizedWeight(Protocol):
    """One logical tensor stored quantized: where its pieces are and how to decode rows.

    Implementations are frozen dataclasses built by
    :meth:`QuantizationFormat.find_weights`, after every piece was checked for
    consistency (shapes, dtypes, sizes): :meth:`read_rows` trusts them.
    """

    @property
    def name(self) -> str:
        """The logical tensor name the model (and the adapter) uses."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (what the format's reference decoder returns)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the reference decoder rounds to (the rows come back in it)."""
        ...

    @property
    def stored_names(self) -> list[str]:
        """Every stored tensor of this weight: none of them reaches OUT as it is."""
        ...

    @property
    def anchor(self) -> str:
        """The stored tensor in whose place (file order) the logical tensor is planned."""
        ...

    @property
    def reads_in_chunks(self) -> bool:
        """True: :meth:`read_rows` decodes any number of rows a fixed chunk at a time, so
        its workspace stays within the format's ``workspace_bound`` however many rows are
        asked for, and the stream may read it in its larger I/O tiles as it reads a plain
        weight (fewer calls: the Python and small torch ops of each call paid less often).
        False: its workspace grows with the rows of a read, which are kept to a tile."""
        ...

    def read_rows(self, stored: StoredRows, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (``0 <= start < stop <= shape[0]``) dequantized, shape
        ``(stop - start, *shape[1:])`` in :attr:`dtype`, bit for bit what the
        reference decoder gives for those rows of the whole tensor."""
        ...

    def check_kept(self, stored: StoredRows) -> None:
        """Refuse what :meth:`read_rows` refuses (NaN or Inf scales) in a weight whose
        stored tensors the output keeps as they are: ``merged_native`` copies a weight
        the adapter does not change byte for byte, so it is never decoded. Reads the
        scales only, a bounded piece at a time.

        Raises:
            InvalidInputError: names the tensor, as :meth:`read_rows` does.
        """
        ...


@runtime_checkable
class SubrowWeight(QuantizedWeight, Protocol):
    """A quantized weight of 3 or more dimensions that decodes part of one row at a time
    (MXFP4's fused experts: a row is a whole expert, larger than a tile)."""

    def read_subrows(
        self,
        stored: StoredRows,
        row: int,
        start: int,
        stop: int,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``weight[row, start:stop]`` dequantized, shape ``(stop - start, *shape[2:])``,
        bit for bit those values of :meth:`QuantizedWeight.read_rows`; in ``compute_dtype``
        where the format decodes straight to it exactly (see
        :meth:`lora_merge.io.reader.SubrowSource.read_subrows`), else in the weight's dtype."""
        ...


class NativeTarget(Protocol):
    """How one merged weight is written back in the base's own format (``merged_native``).

    The planner plans :meth:`stored_specs` (the first is planned as the merged
    weight, the others as written with it); the executor hands :meth:`write` the
    merged rows in tiles of :attr:`dtype`.
    """

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the merged values it quantizes (the 16-bit result)."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """The merged weight's logical shape."""
        ...

    def stored_specs(self, name: str) -> list[TensorSpec]:
        """The stored tensors of the weight ``name``, in the order :meth:`write` writes them."""
        ...

    def held_bytes(self, tile_budget: int) -> int:
        """The most bytes :meth:`write` holds beyond the tiles it is given (the scales it
        keeps to the end, rows it joins into whole blocks), when tiles hold at most
        ``tile_budget`` bytes (``--dry-run``'s memory line counts it)."""
        ...

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Quantize the merged rows (tiles of whole rows, in order; for a weight of 3 or
        more dimensions whose row is wider than a tile, bands of one row's own rows) and
        write every tensor of :meth:`stored_specs` to ``writer``, calling ``on_bytes`` with
        each write's size."""
        ...


class QuantizationFormat(Protocol):
    """One quantization format: recognise it, group its tensors, bound its workspace."""

    @property
    def name(self) -> str:
        """Short name for messages and reports (``fp8``, ``mxfp4``, ``bitsandbytes``)."""
        ...

    @property
    def quant_methods(self) -> tuple[str, ...]:
        """``quantization_config.quant_method`` values this format may serve."""
        ...

    def accepts(self, quantization_config: Mapping[str, object]) -> bool:
        """Whether this format serves a config whose ``quant_method`` is one of
        :attr:`quant_methods` (compressed-tensors: by its ``format``)."""
        ...

    def find_weights(
        self,
        entries: Mapping[str, TensorEntry],
        quantization_config: Mapping[str, object],
        model_dtype: torch.dtype,
    ) -> dict[str, QuantizedWeight]:
        """Every weight of this format among the stored tensors, by logical name.

        ``model_dtype`` is config.json's ``dtype`` (``torch_dtype``; bfloat16 when it
        names none): the dtype formats whose reference decoder returns the model's
        dtype (FP8, MXFP4, ...) dequantize to.

        Raises:
            InvalidInputError: a weight's pieces are missing or inconsistent (a missing
                scale, scales that do not fit the block size, NaN/Inf scales, a packed
                tensor whose size does not match its shape); names the tensor.
        """
        ...

    def describe(
        self, weights: Mapping[str, QuantizedWeight], quantization_config: Mapping[str, object]
    ) -> str:
        """One phrase for reports, e.g. ``fp8 e4m3, 128x128 blocks``."""
        ...

    def output_dtype(
        self, weights: Mapping[str, QuantizedWeight], model_config: Mapping[str, object]
    ) -> torch.dtype | None:
        """The dtype a merge writes when ``--dtype`` is ``auto`` (None: each tensor's own).

        A format that stores its unquantized tensors as the model computes them (FP8,
        MXFP4, INT4: embeddings, norms, routers in the model's dtype, and the float32 a
        model keeps in float32, such as DeepSeek-V3's ``e_score_correction_bias``, which
        transformers keeps in float32 whatever ``dtype`` it loads with) says None: each
        quantized weight is written in the dtype it dequantizes to, every other tensor
        passes through as stored. bitsandbytes says a dtype: QLoRA computed in
        ``bnb_4bit_compute_dtype`` whatever the unquantized tensors were saved as.
        """
        ...

    def workspace_bound(
        self, tile_elements: int, device: torch.device, row_elements: int = 0
    ) -> int:
        """The most bytes one thread's :class:`StoredRows` buffers hold for this format when
        no tile has more than ``tile_elements`` logical elements, and, where weights are
        read in bands of a row (:class:`SubrowWeight`), none has a row of more than
        ``row_elements`` (0: no weight is read so)."""
        ...

    def native_target(
        self, weight: QuantizedWeight, quantization_config: Mapping[str, object]
    ) -> NativeTarget:
        """How ``merged_native`` writes this weight back.

        Raises:
            InvalidInputError: the format cannot be re-quantized faithfully (says why
                and what to use instead).
        """
        ...
