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
from lora_merge.plan.model import LoraBias, LoraProduct, PlannedTensor, TokenRows, TunerUpdate
from lora_merge.plan.tuners.rows import tuner_compute_dtype, tuner_row_merger


class TileBuffers:
    """The two byte buffers a shard's tiles reuse: one for rows read, one for rows written.

    Each tile is written before the next is read, so one of each suffices.
    """

    def __init__(self, tile_bytes: int) -> None:
        self.tile_bytes = tile_bytes
        self.read = torch.empty(tile_bytes, dtype=torch.uint8)
        self._output = torch.empty(tile_bytes, dtype=torch.uint8)

    def output(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The output buffer viewed as ``shape`` of ``dtype``."""
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if nbytes > self._output.numel():  # a single row wider than a tile
            self._output = torch.empty(nbytes, dtype=torch.uint8)
        return self._output[:nbytes].view(dtype).view(shape)


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
    small = isinstance(delta, LoraBias) or not spec.shape or tensor.source == "zeros"
    if small or (isinstance(delta, TunerUpdate) and len(spec.shape) < 2):
        yield _whole_small_tensor(tensor, source, adapter, device)
        return
    row_elements = max(1, int(torch.Size(spec.shape[1:]).numel()))
    widest = max(tensor.source_dtype.itemsize, spec.dtype.itemsize)
    if isinstance(delta, TunerUpdate):  # AdaLoRA, IA3, LoHa, LoKr
        yield from _tuner_tiles(tensor, delta, source, adapter, device, buffers)
        return
    if not isinstance(delta, LoraProduct):
        # A dtype conversion, or an adapter tensor replacing the base's.
        tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))
        for start in range(0, spec.shape[0], tile_rows):
            stop = min(spec.shape[0], start + tile_rows)
            values = source.read_rows(tensor.source_key, start, stop, buffers.read)
            yield buffers.output(spec.dtype, tuple(values.shape)).copy_(values)
        return
    compute_dtype = compute_dtype_for(spec.dtype)
    if norm_per_column(delta):
        # DoRA over columns cannot reproduce PEFT's float32 norm (its sum runs in
        # another order), so it is computed in float64 throughout: correctly
        # rounded, never further from the exact result than PEFT's.
        compute_dtype = torch.float64
    widest = max(widest, compute_dtype.itemsize)
    tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))
    if delta.experts > 1 and delta.expert is None:
        yield from _fused_expert_tiles(tensor, delta, source, adapter, device, buffers, tile_rows)
        return
    product = _ProductRows(
        tensor, delta, source, adapter, device, buffers, tile_rows, compute_dtype
    )
    yield from product.tiles()


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
    if isinstance(delta, TunerUpdate):  # IA3's bias, scaled with its layer's outputs
        compute_dtype = tuner_compute_dtype(delta, spec.dtype)
        rows = values.to(device).reshape(-1, 1)
        merge = tuner_row_merger(delta, adapter, tuple(rows.shape), compute_dtype, device)
        return merge(rows, 0).to(spec.dtype).reshape(values.shape).cpu()
    return values.to(spec.dtype)


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
    compute_dtype = tuner_compute_dtype(delta, spec.dtype)
    row_elements = max(1, int(torch.Size(spec.shape[1:]).numel()))
    widest = max(tensor.source_dtype.itemsize, spec.dtype.itemsize, compute_dtype.itemsize)
    tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))
    merge = tuner_row_merger(delta, adapter, spec.shape, compute_dtype, device)
    for start in range(0, spec.shape[0], tile_rows):
        stop = min(spec.shape[0], start + tile_rows)
        values = source.read_rows(tensor.source_key, start, stop, buffers.read).to(device)
        merged = merge(values.reshape(stop - start, -1), start)
        if merged.dtype == torch.float64 and spec.dtype.itemsize == 2:
            merged = round_float64_to(merged, spec.dtype)
        out = buffers.output(spec.dtype, tuple(values.shape))
        # The one rounding, as for LoRA (see _ProductRows.tiles).
        yield out.view(stop - start, -1).copy_(merged.cpu()).view(values.shape)


class _ProductRows:
    """``W + scale * B @ A`` (and DoRA's rescaling) over one weight's row tiles.

    Holds what the tensor's tiles share: the factors in the compute dtype, one
    workspace for the product, DoRA's magnitudes.
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
    ) -> None:
        self.tensor, self.delta, self.source = tensor, delta, source
        self.device, self.buffers, self.tile_rows = device, buffers, tile_rows
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

    def merged(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows start:stop, and V = W + scale * B @ A over them (flat rows)."""
        values = self.source.read_rows(self.tensor.source_key, start, stop, self.buffers.read).to(
            self.device
        )
        count = stop - start
        workspace = self.workspace[:, :count] if self.delta.transposed else self.workspace[:count]
        return values, merged_rows(values.reshape(count, -1), self.factors, start, workspace)

    def column_factor(self) -> torch.Tensor:
        """DoRA's ``m / ||column||`` for every column of V.

        The norm of each column spans every row, so this first pass sums its squares
        tile by tile; only a vector as long as a row is kept.
        """
        assert self.magnitude is not None
        rows = self.tensor.spec.shape[0]
        sums = torch.zeros(self.row_elements, dtype=torch.float64, device=self.device)
        for start in range(0, rows, self.tile_rows):
            sums += column_sums_of_squares(self.merged(start, min(rows, start + self.tile_rows))[1])
        return dora_column_factor(self.magnitude, sums)

    def tiles(self) -> Iterator[torch.Tensor]:
        """The merged rows, tile by tile, rounded once into the output buffer."""
        spec = self.tensor.spec
        column_factor = self.column_factor() if norm_per_column(self.delta) else None
        on_cpu = self.device.type == "cpu"
        for start in range(0, spec.shape[0], self.tile_rows):
            stop = min(spec.shape[0], start + self.tile_rows)
            values, merged = self.merged(start, stop)
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
            out = self.buffers.output(spec.dtype, tuple(values.shape))
            if not on_cpu:
                merged = merged.to(spec.dtype).cpu()
            yield out.view(stop - start, -1).copy_(merged).view(values.shape)


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
