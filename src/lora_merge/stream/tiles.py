"""One output tensor's values, as consecutive row tiles: read a tile, merge it, hand it on.

On the CPU the tiles are sized to stay in the L2 cache and the same buffers are
reused for every tile (:class:`TileBuffers`); on a GPU they are as large as the
memory budget allows, to amortise transfers. Either way memory holds one tile of
a tensor and its LoRA factors, never the whole tensor.

What is added comes from the plan: a LoRA product's factors are read by its
layer kind (:func:`lora_merge.plan.kinds.factors.read_lora_factors`), merged by
:func:`lora_merge.compute.lora.merged_rows`, rescaled for DoRA
(:mod:`lora_merge.plan.kinds.dora`) and rounded once to the output dtype.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch

from lora_merge.compute.lora import (
    compute_dtype_for,
    merged_rows,
    prepare_lora_factors,
    round_float64_to,
)
from lora_merge.io.reader import TensorSource
from lora_merge.plan.kinds.bias import merge_lora_bias
from lora_merge.plan.kinds.dora import (
    column_sums_of_squares,
    dora_column_factor,
    dora_scale_columns,
    dora_scale_rows,
    norm_per_column,
    read_magnitude,
)
from lora_merge.plan.kinds.experts import expert_lora_factors
from lora_merge.plan.kinds.factors import read_lora_factors
from lora_merge.plan.model import LoraBias, LoraProduct, PlannedTensor, TokenRows


class TileBuffers:
    """The byte buffers one thread's tiles reuse: rows read, the merge workspace, rows written.

    Each tile is written before the same thread reads the next, so one of each suffices.
    """

    def __init__(self, tile_bytes: int) -> None:
        self.tile_bytes = tile_bytes
        self.read = torch.empty(tile_bytes, dtype=torch.uint8)
        self._output = torch.empty(tile_bytes, dtype=torch.uint8)
        self._workspace = torch.empty(tile_bytes, dtype=torch.uint8)

    def output(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The output buffer viewed as ``shape`` of ``dtype``."""
        self._output = _at_least(self._output, dtype, shape)
        return _viewed(self._output, dtype, shape)

    @property
    def scratch(self) -> torch.Tensor:
        """The workspace's bytes, free once a tile is rounded into the output buffer."""
        return self._workspace

    def workspace(
        self, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """A buffer for the merge's product, ``shape`` of ``dtype`` (fresh on a GPU)."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        self._workspace = _at_least(self._workspace, dtype, shape)
        return _viewed(self._workspace, dtype, shape)


def _at_least(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``buffer``, or a larger one when ``shape`` of ``dtype`` does not fit (a row wider than a tile)."""
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    return buffer if nbytes <= buffer.numel() else torch.empty(nbytes, dtype=torch.uint8)


def _viewed(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    return buffer[:nbytes].view(dtype).view(shape)


def output_tiles(
    tensor: PlannedTensor,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    buffers: TileBuffers,
) -> Iterator[torch.Tensor]:
    """The output tensor's values, as consecutive row tiles in CPU buffers from ``buffers``.

    Args:
        tensor: the planned tensor.
        source: where its starting values are read (the base, or the adapter for a replacement).
        adapter: the adapter's tensors (factors, biases, magnitudes).
        device: where the merge arithmetic runs.
        buffers: the calling thread's tile buffers; each tile is valid until the next.
    """
    spec, delta = tensor.spec, tensor.delta
    if isinstance(delta, LoraBias) or not spec.shape or tensor.source == "zeros":
        yield _whole_small_tensor(tensor, source, adapter, device)
        return
    if isinstance(delta, LoraProduct) and delta.experts > 1 and delta.expert is None:
        tile_rows = _tile_rows(tensor, buffers.tile_bytes, compute_dtype_for(spec.dtype))
        yield from _fused_expert_tiles(tensor, delta, source, adapter, device, buffers, tile_rows)
        return
    rows = _rows_of(tensor, source, adapter, device, buffers.tile_bytes)
    yield from rows.tiles(buffers)


def independent_row_tiles(
    tensor: PlannedTensor,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    tile_bytes: int,
) -> ConvertedRows | ProductRows | None:
    """The tensor as row tiles that any thread may compute, in any order; None if it has none.

    Biases and scalars are read whole, a fused expert weight goes a few experts at a
    time and DoRA over columns needs a pass over every row first: those are
    streamed whole by one thread (:func:`output_tiles`).
    """
    spec, delta = tensor.spec, tensor.delta
    if isinstance(delta, LoraBias) or not spec.shape or tensor.source == "zeros":
        return None
    if isinstance(delta, LoraProduct) and (
        (delta.experts > 1 and delta.expert is None) or norm_per_column(delta)
    ):
        return None
    return _rows_of(tensor, source, adapter, device, tile_bytes)


def _rows_of(
    tensor: PlannedTensor,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    tile_bytes: int,
) -> ConvertedRows | ProductRows:
    delta = tensor.delta
    if not isinstance(delta, LoraProduct):
        # A dtype conversion, or an adapter tensor replacing the base's.
        return ConvertedRows(tensor, source, _tile_rows(tensor, tile_bytes, None))
    compute_dtype = compute_dtype_for(tensor.spec.dtype)
    if norm_per_column(delta):
        # DoRA over columns cannot reproduce PEFT's float32 norm (its sum runs in
        # another order), so it is computed in float64 throughout: correctly
        # rounded, never further from the exact result than PEFT's.
        compute_dtype = torch.float64
    tile_rows = _tile_rows(tensor, tile_bytes, compute_dtype)
    return ProductRows(tensor, delta, source, adapter, device, tile_rows, compute_dtype)


def _tile_rows(tensor: PlannedTensor, tile_bytes: int, compute_dtype: torch.dtype | None) -> int:
    """Rows per tile: as many as fit ``tile_bytes`` in the widest form a row takes."""
    row_elements = max(1, int(torch.Size(tensor.spec.shape[1:]).numel()))
    widest = max(tensor.source_dtype.itemsize, tensor.spec.dtype.itemsize)
    if compute_dtype is not None:
        widest = max(widest, compute_dtype.itemsize)
    return max(1, tile_bytes // (row_elements * widest))


def _whole_small_tensor(
    tensor: PlannedTensor, source: TensorSource, adapter: TensorSource, device: torch.device
) -> torch.Tensor:
    """A bias or a scalar, in one piece and fresh memory (they are small)."""
    spec, delta = tensor.spec, tensor.delta
    if tensor.source == "zeros":  # a bias the base lacks (see MergePlan)
        values = torch.zeros(spec.shape, dtype=spec.dtype)
    else:
        values = source.read_rows(tensor.source_key)
    if isinstance(delta, LoraBias):
        lora_bias = adapter.read_rows(delta.bias_key).to(device)
        return merge_lora_bias(values.to(device), lora_bias, delta.scale, spec.dtype).cpu()
    return values.to(spec.dtype)


class ConvertedRows:
    """A tensor whose values are its source's, converted to the output dtype, a tile at a time."""

    def __init__(self, tensor: PlannedTensor, source: TensorSource, tile_rows: int) -> None:
        self.tensor, self.source, self.tile_rows = tensor, source, tile_rows
        self.rows = tensor.spec.shape[0]

    def tile(self, start: int, stop: int, buffers: TileBuffers) -> torch.Tensor:
        """Rows start:stop, converted into ``buffers``' output buffer."""
        values = self.source.read_rows(self.tensor.source_key, start, stop, buffers.read)
        return buffers.output(self.tensor.spec.dtype, tuple(values.shape)).copy_(values)

    def tiles(self, buffers: TileBuffers) -> Iterator[torch.Tensor]:
        """Every tile, in order."""
        for start in range(0, self.rows, self.tile_rows):
            yield self.tile(start, min(self.rows, start + self.tile_rows), buffers)


class ProductRows:
    """``W + scale * B @ A`` (and DoRA's rescaling) over one weight's row tiles.

    Holds what the tensor's tiles share, read-only once made, so several threads
    may compute its tiles at once: the factors in the compute dtype, DoRA's
    magnitudes. Each thread brings its own buffers.
    """

    def __init__(
        self,
        tensor: PlannedTensor,
        delta: LoraProduct,
        source: TensorSource,
        adapter: TensorSource,
        device: torch.device,
        tile_rows: int,
        compute_dtype: torch.dtype,
    ) -> None:
        self.tensor, self.delta, self.source = tensor, delta, source
        self.device, self.tile_rows, self.compute_dtype = device, tile_rows, compute_dtype
        self.rows = tensor.spec.shape[0]
        self.row_elements = max(1, int(torch.Size(tensor.spec.shape[1:]).numel()))
        lora_a, lora_b = read_lora_factors(delta, adapter)
        # (A whole delta, ``dense``, has no B: A is already (out, in).)
        self.factors = prepare_lora_factors(
            lora_a.to(device),
            None if lora_b is None else lora_b.to(device),
            delta.scale,
            delta.transposed,
            compute_dtype,
        )
        factors = self.factors
        self._out_features = (
            factors.lora_a.shape[0] if factors.lora_b is None else factors.lora_b.shape[0]
        )
        self.magnitude = None
        if delta.magnitude_key is not None:
            self.magnitude = read_magnitude(delta, adapter).to(device=device, dtype=compute_dtype)

    def merged(
        self, start: int, stop: int, buffers: TileBuffers
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows start:stop, and V = W + scale * B @ A over them (flat rows)."""
        values = self.source.read_rows(self.tensor.source_key, start, stop, buffers.read).to(
            self.device
        )
        count = stop - start
        if self.delta.transposed:
            shape = (self._out_features, count)
        else:
            shape = (count, self.factors.lora_a.shape[1])
        workspace = buffers.workspace(self.compute_dtype, shape, self.device)
        return values, merged_rows(values.reshape(count, -1), self.factors, start, workspace)

    def column_factor(self, buffers: TileBuffers) -> torch.Tensor:
        """DoRA's ``m / ||column||`` for every column of V.

        The norm of each column spans every row, so this first pass sums its squares
        tile by tile; only a vector as long as a row is kept.
        """
        assert self.magnitude is not None
        sums = torch.zeros(self.row_elements, dtype=torch.float64, device=self.device)
        for start in range(0, self.rows, self.tile_rows):
            stop = min(self.rows, start + self.tile_rows)
            sums += column_sums_of_squares(self.merged(start, stop, buffers)[1])
        return dora_column_factor(self.magnitude, sums)

    def tiles(self, buffers: TileBuffers) -> Iterator[torch.Tensor]:
        """The merged rows, tile by tile, rounded once into the output buffer."""
        column_factor = self.column_factor(buffers) if norm_per_column(self.delta) else None
        for start in range(0, self.rows, self.tile_rows):
            yield self.tile(start, min(self.rows, start + self.tile_rows), buffers, column_factor)

    def tile(
        self,
        start: int,
        stop: int,
        buffers: TileBuffers,
        column_factor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows start:stop merged and rounded once into ``buffers``' output buffer."""
        spec = self.tensor.spec
        values, merged = self.merged(start, stop, buffers)
        if column_factor is not None:
            merged = dora_scale_columns(merged, column_factor)
        elif self.magnitude is not None:
            dora_scale_rows(merged, self.magnitude[start:stop])
        if merged.dtype == torch.float64 and spec.dtype.itemsize == 2:
            merged = round_float64_to(merged, spec.dtype)
        # The one rounding: a copy of the float32/float64 sum into the output dtype.
        # (Two kernels, add then copy, rather than one ``torch.add(..., out=<16-bit>)``:
        # that mixed-dtype form is ~6x slower on CPU, 2.2 vs 0.37 ns per element
        # measured, and gives the same bits.)
        out = buffers.output(spec.dtype, tuple(values.shape))
        if self.device.type != "cpu":
            merged = merged.to(spec.dtype).cpu()
        return out.view(stop - start, -1).copy_(merged).view(values.shape)


def _fused_expert_tiles(
    tensor: PlannedTensor,
    delta: LoraProduct,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    buffers: TileBuffers,
    tile_experts: int,
) -> Iterator[torch.Tensor]:
    """Tiles of a fused (E, X, Y) expert weight, a few whole experts at a time.

    Each expert's delta is an ordinary 2-D LoRA product (see ``expert_lora_factors``),
    merged into its (X, Y) slice; memory holds one tile of experts and one
    expert's delta, whatever E is.
    """
    spec = tensor.spec
    compute_dtype = compute_dtype_for(spec.dtype)
    lora_a, lora_b = read_lora_factors(delta, adapter)
    assert lora_b is not None
    lora_a, lora_b = lora_a.to(device), lora_b.to(device)
    experts = spec.shape[0]
    for start in range(0, experts, tile_experts):
        stop = min(experts, start + tile_experts)
        values = source.read_rows(tensor.source_key, start, stop, buffers.read).to(device)
        out = torch.empty(values.shape, dtype=spec.dtype, device=device)
        for index in range(stop - start):
            lora_a_e, lora_b_e = expert_lora_factors(lora_a, lora_b, start + index, experts)
            factors = prepare_lora_factors(
                lora_a_e, lora_b_e, delta.scale, delta.transposed, compute_dtype
            )
            # The one rounding, as for every other weight (see _ProductRows.tiles).
            out[index].copy_(merged_rows(values[index], factors, 0))
        yield buffers.output(spec.dtype, tuple(values.shape)).copy_(out.cpu())


def with_token_rows(
    tiles: Iterator[torch.Tensor], token_rows: TokenRows, adapter: TensorSource
) -> Iterator[torch.Tensor]:
    """The tiles, with the rows trainable tokens replace overwritten (cast once)."""
    new_rows = adapter.read_rows(token_rows.key)
    source_of = {row: i for i, row in enumerate(token_rows.indices)}  # a repeated id: the last
    rows = sorted(source_of)
    start = 0
    for tile in tiles:
        stop = start + tile.shape[0]
        for row in rows[bisect.bisect_left(rows, start) : bisect.bisect_left(rows, stop)]:
            tile[row - start].copy_(new_rows[source_of[row]])
        start = stop
        yield tile
