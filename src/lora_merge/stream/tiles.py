"""One output tensor's values, as consecutive row tiles: read a tile, merge it, hand it on.

On the CPU the tiles are sized to stay in the L2 cache and the same buffers are
reused for every tile (:class:`TileBuffers`); on a GPU they are as large as the
memory budget allows, to amortise transfers. Either way memory holds one tile of
a tensor and its LoRA factors, never the whole tensor.

What is added comes from the plan: a LoRA product's factors are read by its
layer kind (:func:`lora_merge.plan.kinds.factors.read_lora_factors`), merged by
:func:`lora_merge.compute.lora.merged_rows`, rescaled for DoRA
(:mod:`lora_merge.plan.kinds.dora`) and rounded once to the output dtype. Fused
expert weights, a LoRA per expert, are merged in :mod:`lora_merge.stream.expert_tiles`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lora_merge.compute.lora import (
    compute_dtype_for,
    merged_rows,
    prepare_lora_factors,
    round_float64_to,
    rounds_to_finite,
)
from lora_merge.io.reader import SubrowSource, TensorSource
from lora_merge.plan.kinds.bias import merge_lora_bias
from lora_merge.plan.kinds.dora import (
    column_sums_of_squares,
    dora_column_factor,
    dora_scale_columns,
    dora_scale_rows,
    norm_per_column,
    read_magnitude,
)
from lora_merge.plan.kinds.factors import read_lora_factors
from lora_merge.plan.model import LoraBias, LoraProduct, PlannedTensor, TokenRows, TunerUpdate
from lora_merge.plan.tuners.rows import tuner_compute_dtype, tuner_row_merger
from lora_merge.stream.expert_tiles import fused_expert_bands, fused_expert_tiles
from lora_merge.stream.tile_buffers import TileBuffers


@dataclass(frozen=True)
class OutputTile:
    """Consecutive rows of an output tensor, in its output dtype.

    Attributes:
        values: the rows; a view of the thread's reused buffers, valid until the next tile.
        finite: the merge proved every value finite before rounding it
            (:func:`lora_merge.compute.lora.rounds_to_finite`); False when not known,
            and the caller checks ``values``.
    """

    values: torch.Tensor
    finite: bool = False


def output_tiles(
    tensor: PlannedTensor,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    buffers: TileBuffers,
    io_sized: bool = False,
) -> Iterator[OutputTile]:
    """The output tensor's values, as consecutive row tiles in CPU buffers from ``buffers``.

    Args:
        tensor: the planned tensor.
        source: where its starting values are read (the base, or the adapter for a replacement).
        adapter: the adapter's tensors (factors, biases, magnitudes).
        device: where the merge arithmetic runs.
        buffers: the calling thread's tile buffers; each tile is valid until the next.
        io_sized: a LoRA product's tiles may fill the buffers (``buffers.io_bytes``);
            otherwise every tile holds at most ``buffers.tile_bytes``, as a re-quantizing
            writer counts its tiles.
    """
    spec, delta = tensor.spec, tensor.delta
    small = isinstance(delta, LoraBias) or not spec.shape or tensor.source == "zeros"
    if small or (isinstance(delta, TunerUpdate) and len(spec.shape) < 2):
        yield OutputTile(_whole_small_tensor(tensor, source, adapter, device))
        return
    row_elements = max(1, int(torch.Size(spec.shape[1:]).numel()))
    widest = max(tensor.source_dtype.itemsize, spec.dtype.itemsize)
    if isinstance(delta, TunerUpdate):  # AdaLoRA, IA3, LoHa, LoKr
        yield from _unchecked(_tuner_tiles(tensor, delta, source, adapter, device, buffers))
        return
    if not isinstance(delta, LoraProduct):
        # A dtype conversion, or an adapter tensor replacing the base's.
        tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))
        if tile_row_elements(tensor, buffers.tile_bytes) < row_elements and isinstance(
            source, SubrowSource
        ):
            yield from _unchecked(_copied_bands(tensor, source, buffers, widest))
            return
        for start in range(0, spec.shape[0], tile_rows):
            stop = min(spec.shape[0], start + tile_rows)
            values = source.read_rows(tensor.source_key, start, stop, buffers.read)
            yield OutputTile(buffers.output(spec.dtype.torch, tuple(values.shape)).copy_(values))
        return
    compute_dtype = compute_dtype_for(spec.dtype.torch)
    if norm_per_column(delta):
        # DoRA over columns cannot reproduce PEFT's float32 norm (its sum runs in
        # another order), so it is computed in float64 throughout: correctly
        # rounded, never further from the exact result than PEFT's.
        compute_dtype = torch.float64
    widest = max(widest, compute_dtype.itemsize)
    tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))
    if delta.experts > 1 and delta.expert is None:
        if tile_row_elements(tensor, buffers.tile_bytes) < row_elements and isinstance(
            source, SubrowSource
        ):
            band = band_rows(tensor, buffers, widest)
            bands = fused_expert_bands(
                tensor, delta, source, adapter, device, buffers, band, compute_dtype
            )
            yield from _unchecked(bands)
            return
        experts = fused_expert_tiles(tensor, delta, source, adapter, device, buffers, tile_rows)
        yield from _unchecked(experts)
        return
    product = _ProductRows(
        tensor, delta, source, adapter, device, buffers, tile_rows, compute_dtype, io_sized
    )
    yield from product.tiles()


def _unchecked(tiles: Iterator[torch.Tensor]) -> Iterator[OutputTile]:
    """Tiles whose finiteness the caller checks."""
    for values in tiles:
        yield OutputTile(values)


def tile_row_elements(tensor: PlannedTensor, tile_bytes: int) -> int:
    """Elements of the smallest piece of ``tensor`` one tile holds: a row (first dimension),
    or part of one (``shape[2:]``) for a tensor of 3 or more dimensions read from the base
    and merged with no LoRA or a fused-experts one (:func:`~lora_merge.stream.expert_tiles.fused_expert_bands`), whose row
    is a whole expert.

    Args:
        tensor: the planned tensor.
        tile_bytes: a tile's bytes: part of a row only where a row of the widest compute
            dtype (8 bytes) is wider.
    """
    shape, delta = tensor.spec.shape, tensor.delta
    row_elements = max(1, math.prod(shape[1:]))
    if len(shape) < 3 or tensor.source != "base" or isinstance(delta, (LoraBias, TunerUpdate)):
        return row_elements
    if isinstance(delta, LoraProduct) and (delta.experts <= 1 or delta.expert is not None):
        return row_elements
    if row_elements * 8 <= tile_bytes:
        return row_elements
    return max(1, math.prod(shape[2:]))


def band_rows(tensor: PlannedTensor, buffers: TileBuffers, widest: int) -> int:
    """Rows of ``shape[1]`` in one band of a row (at least one)."""
    return max(1, buffers.tile_bytes // (max(1, math.prod(tensor.spec.shape[2:])) * widest))


def _copied_bands(
    tensor: PlannedTensor, source: SubrowSource, buffers: TileBuffers, widest: int
) -> Iterator[torch.Tensor]:
    """A tensor whose row is wider than a tile (an MXFP4 expert), converted a band of each
    row's own rows at a time."""
    spec = tensor.spec
    band = band_rows(tensor, buffers, widest)
    for row in range(spec.shape[0]):
        for start in range(0, spec.shape[1], band):
            stop = min(spec.shape[1], start + band)
            values = source.read_subrows(tensor.source_key, row, start, stop, buffers.read)
            yield buffers.output(spec.dtype.torch, tuple(values.shape)).copy_(values)


def _whole_small_tensor(
    tensor: PlannedTensor, source: TensorSource, adapter: TensorSource, device: torch.device
) -> torch.Tensor:
    """A bias or a scalar, in one piece and fresh memory (they are small)."""
    spec, delta = tensor.spec, tensor.delta
    if tensor.source == "zeros":  # a bias the base lacks (see MergePlan)
        values = torch.zeros(spec.shape, dtype=spec.dtype.torch)
    else:
        values = source.read_rows(tensor.source_key)
    if isinstance(delta, LoraBias):
        lora_bias = adapter.read_rows(delta.bias_key).to(device)
        return merge_lora_bias(values.to(device), lora_bias, delta.scale, spec.dtype.torch).cpu()
    if isinstance(delta, TunerUpdate):  # IA3's bias, scaled with its layer's outputs
        compute_dtype = tuner_compute_dtype(delta, spec.dtype.torch)
        rows = values.to(device).reshape(-1, 1)
        merge = tuner_row_merger(delta, adapter, tuple(rows.shape), compute_dtype, device)
        return merge(rows, 0).to(spec.dtype.torch).reshape(values.shape).cpu()
    return values.to(spec.dtype.torch)


def _tuner_tiles(
    tensor: PlannedTensor,
    delta: TunerUpdate,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    buffers: TileBuffers,
) -> Iterator[torch.Tensor]:
    """The tiles of a weight an AdaLoRA, IA3, LoHa or LoKr module changes, each rounded once."""
    spec = tensor.spec
    compute_dtype = tuner_compute_dtype(delta, spec.dtype.torch)
    row_elements = max(1, int(torch.Size(spec.shape[1:]).numel()))
    widest = max(tensor.source_dtype.itemsize, spec.dtype.itemsize, compute_dtype.itemsize)
    tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))
    merge = tuner_row_merger(delta, adapter, spec.shape, compute_dtype, device)
    for start in range(0, spec.shape[0], tile_rows):
        stop = min(spec.shape[0], start + tile_rows)
        values = source.read_rows(tensor.source_key, start, stop, buffers.read).to(device)
        merged = merge(values.reshape(stop - start, -1), start)
        if merged.dtype == torch.float64 and spec.dtype.itemsize == 2:
            merged = round_float64_to(merged, spec.dtype.torch)
        out = buffers.output(spec.dtype.torch, tuple(values.shape))
        # The one rounding, as for LoRA (see _ProductRows.tiles).
        yield out.view(stop - start, -1).copy_(merged.cpu()).view(values.shape)


class _ProductRows:
    """``W + scale * B @ A`` (and DoRA's rescaling) over one weight's row tiles.

    Holds what the tensor's tiles share: the factors in the compute dtype, one
    workspace for the product, DoRA's magnitudes.

    On the CPU a tile read (and written) spans several blocks of the workspace:
    the arithmetic runs block by block, each block's product, sum, check and
    rounding in the L2 cache before the next, while the reads, writes and Python
    around them are paid once per tile (``TileBuffers.io_bytes``: a bfloat16 tile
    of 2 MiB holds 8 blocks of a 512 KiB float32 workspace). Measured on the
    TinyLlama shape, one thread: 0.2 user CPU-s less per 1e9 merged values than
    tiles of 1 block, and as much again against tiles of 2.
    """

    def __init__(
        self,
        tensor: PlannedTensor,
        delta: LoraProduct,
        source: TensorSource,
        adapter: TensorSource,
        device: torch.device,
        buffers: TileBuffers,
        tile_rows: int,
        compute_dtype: torch.dtype,
        io_sized: bool,
    ) -> None:
        self.tensor, self.delta, self.source = tensor, delta, source
        self.device, self.buffers, self.tile_rows = device, buffers, tile_rows
        self.row_elements = max(1, int(torch.Size(tensor.spec.shape[1:]).numel()))
        # Rows per read: what the read and output buffers hold. An as-trained weight, or
        # a dequantized one whose reader's workspace grows with the rows read, is read a
        # block at a time (its workspace is counted for tiles of tile_bytes); on a GPU a
        # block is already as large as the budget allows. (FP8 matrices decode a run at a
        # time: read in I/O tiles, a 1-layer DeepSeek-V3-widths slice merged on one thread
        # in 3.35-3.47 CPU-s instead of 4.3-4.4, against 2.9-3.5 for its bf16 twin; see
        # docs/quantized-bases.md.)
        self.read_rows = tile_rows
        plain_read = (
            not tensor.dequantized or tensor.dequantized_in_chunks
        ) and tensor.as_trained is None
        if io_sized and device.type == "cpu" and plain_read:
            stored = max(tensor.source_dtype.itemsize, tensor.spec.dtype.itemsize)
            self.read_rows = max(tile_rows, buffers.io_bytes // (self.row_elements * stored))
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
        out_features = (
            factors.lora_a.shape[0] if factors.lora_b is None else factors.lora_b.shape[0]
        )
        workspace_rows = out_features if delta.transposed else tile_rows
        workspace_columns = tile_rows if delta.transposed else factors.lora_a.shape[1]
        self.workspace = torch.empty(
            (workspace_rows, workspace_columns), dtype=compute_dtype, device=device
        )
        self.magnitude = None
        if delta.magnitude_key is not None:
            self.magnitude = read_magnitude(delta, adapter).to(device=device, dtype=compute_dtype)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """The stored rows start:stop, on the merge's device."""
        return self.source.read_rows(self.tensor.source_key, start, stop, self.buffers.read).to(
            self.device
        )

    def merged(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """V = W + scale * B @ A over stored rows (flat, at most ``tile_rows``) from ``start``."""
        count = rows.shape[0]
        workspace = self.workspace[:, :count] if self.delta.transposed else self.workspace[:count]
        return merged_rows(rows, self.factors, start, workspace)

    def column_factor(self) -> torch.Tensor:
        """DoRA's ``m / ||column||`` for every column of V.

        The norm of each column spans every row, so this first pass sums its squares
        tile by tile; only a vector as long as a row is kept.
        """
        assert self.magnitude is not None
        rows = self.tensor.spec.shape[0]
        sums = torch.zeros(self.row_elements, dtype=torch.float64, device=self.device)
        for start in range(0, rows, self.tile_rows):
            stop = min(rows, start + self.tile_rows)
            values = self.read(start, stop).reshape(stop - start, -1)
            sums += column_sums_of_squares(self.merged(values, start))
        return dora_column_factor(self.magnitude, sums)

    def tiles(self) -> Iterator[OutputTile]:
        """The merged rows, tile by tile, rounded once into the output buffer."""
        spec = self.tensor.spec
        column_factor = self.column_factor() if norm_per_column(self.delta) else None
        on_cpu = self.device.type == "cpu"
        for start in range(0, spec.shape[0], self.read_rows):
            stop = min(spec.shape[0], start + self.read_rows)
            values = self.read(start, stop)
            stored = values.reshape(stop - start, -1)
            out = self.buffers.output(spec.dtype.torch, tuple(values.shape))
            rounded = out.view(stop - start, -1)
            finite = True
            for block in range(start, stop, self.tile_rows):
                block_stop = min(stop, block + self.tile_rows)
                merged = self.merged(stored[block - start : block_stop - start], block)
                if column_factor is not None:
                    merged = dora_scale_columns(merged, column_factor)
                elif self.magnitude is not None:
                    dora_scale_rows(merged, self.magnitude[block:block_stop])
                if merged.dtype == torch.float64 and spec.dtype.itemsize == 2:
                    merged = round_float64_to(merged, spec.dtype.torch)
                # Checked before the rounding, while the block is in cache (False when
                # unproven: the caller then checks the rounded values).
                finite = finite and rounds_to_finite(merged, spec.dtype.torch)
                if not on_cpu:
                    merged = merged.to(spec.dtype.torch).cpu()
                # The one rounding: a copy of the float32/float64 sum into the output
                # dtype. (Two kernels, add then copy, rather than one ``torch.add(...,
                # out=<16-bit>)``: that mixed-dtype form is ~6x slower on CPU, 2.2 vs
                # 0.37 ns per element measured, and gives the same bits.)
                rounded[block - start : block_stop - start].copy_(merged)
            yield OutputTile(out, finite)


def with_token_rows(
    tiles: Iterator[OutputTile], token_rows: TokenRows, adapter: TensorSource
) -> Iterator[OutputTile]:
    """The tiles, with the rows trainable tokens replace overwritten (cast once; their
    finiteness then unknown)."""
    new_rows = adapter.read_rows(token_rows.key)
    source_of = {row: i for i, row in enumerate(token_rows.indices)}  # a repeated id: the last
    rows = sorted(source_of)
    start = 0
    for tile in tiles:
        values = tile.values
        stop = start + values.shape[0]
        for row in rows[bisect.bisect_left(rows, start) : bisect.bisect_left(rows, stop)]:
            values[row - start].copy_(new_rows[source_of[row]])
        start = stop
        yield OutputTile(values)
