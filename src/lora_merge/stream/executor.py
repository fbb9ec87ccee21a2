"""Run a merge plan: stream every output tensor from its source into its shard.

Untouched tensors whose dtype does not change are copied as bytes, in the
kernel. Every other tensor is processed in row tiles: read a tile, merge it,
write it, move on. On the CPU the tiles are sized to stay in the L2 cache and
the same buffers are reused for every tile. Measured on a TinyLlama-shaped
merge (2 cores): whole-tensor passes were 5x slower than tiles, fresh buffers
per tile cost as much again in page faults, and a background writer thread
made things slower (it fights the math for the two cores and pulls every tile
across caches); instead whole tensors are spread over one thread per core,
each reading, merging and writing its own tiles. On a GPU, tiles are as large
as the memory budget allows, to amortise transfers. No thread ever holds more
than one tile of a tensor, so memory does not grow with the model.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from lora_merge.adapter.combined import CombinedAdapter
from lora_merge.compute.lora import (
    all_finite,
    column_sums_of_squares,
    compute_dtype_for,
    dora_column_factor,
    dora_scale_columns,
    dora_scale_rows,
    expand_merged_linear_b,
    expert_lora_factors,
    merge_lora_bias,
    merged_rows,
    prepare_lora_factors,
    round_float64_to,
)
from lora_merge.errors import NonFiniteError
from lora_merge.io.reader import InMemoryTensors, StoredTensorSource, TensorSource
from lora_merge.io.safetensors_format import dtype_itemsize
from lora_merge.io.shard_writer import ShardWriter, TensorSpec
from lora_merge.plan.planner import LoraBias, LoraProduct, PlannedTensor, TokenRows
from lora_merge.stream.requantize import write_requantized

# Bytes of merge workspace (the float32/float64 accumulator) per CPU tile. With
# the rows read and the rows written it stays within a 2 MiB L2 cache.
CPU_TILE_WORKSPACE_BYTES = 2**19


def tile_budget_for(device: torch.device, memory_budget: int) -> int:
    """Workspace bytes per tile: cache-sized on the CPU, budget-sized on a GPU."""
    if device.type == "cpu":
        return min(CPU_TILE_WORKSPACE_BYTES, memory_budget)
    return memory_budget // 4


def stream_workers(device: torch.device) -> int:
    """Threads that write a shard's tensors at once: one per core on the CPU, one feeding a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def working_memory_bound(
    shards: Iterable[Sequence[PlannedTensor]],
    adapter: TensorSource,
    device: torch.device,
    tile_budget: int,
) -> int:
    """An upper bound of the tensor data the stream holds at once (``--dry-run``'s memory line).

    Each of the :func:`stream_workers` threads keeps its tile buffers (rows read, rows
    written, the float32/float64 workspace) and, while it writes a tensor, what that
    tensor needs whole: above all a LoRA product's factors, in every form the merge
    makes of them (see :func:`_tensor_bytes`). The threads share the tensors of one
    shard, so at most the ``workers`` largest of those amounts are held together;
    comparing bytes, never shapes.

    Args:
        shards: the planned tensors of each output shard.
        adapter: the adapter's tensors (their dtypes and shapes).
        device: where the merge runs.
        tile_budget: bytes of merge workspace per tile (see :func:`tile_budget_for`).
    """
    workers = stream_workers(device)
    shard_lists = [list(tensors) for tensors in shards]
    # A row wider than a tile makes every buffer one row long instead.
    widest_row = max(
        (
            8 * math.prod(t.spec.shape[1:])
            for tensors in shard_lists
            for t in tensors
            if len(t.spec.shape) > 1
        ),
        default=0,
    )
    per_thread = 3 * max(tile_budget, widest_row)
    in_flight = 0
    for tensors in shard_lists:
        held = sorted(
            (_tensor_bytes(t, adapter, tile_budget) for t in tensors if t.written_with is None),
            reverse=True,
        )
        in_flight = max(in_flight, sum(held[:workers]))
    resident = 0
    if isinstance(adapter, InMemoryTensors):  # a pickled adapter is loaded whole
        resident = sum(
            adapter.dtype(key).itemsize * math.prod(adapter.shape(key))
            for key in list(adapter.keys())
        )
    # Each thread keeps the last module a combination computed for it.
    cached = adapter.factor_cache_bytes() if isinstance(adapter, CombinedAdapter) else 0
    return workers * (per_thread + cached) + in_flight + resident


def _tensor_bytes(tensor: PlannedTensor, adapter: TensorSource, tile_budget: int) -> int:
    """What one thread holds whole, beyond its tile buffers, while it writes ``tensor``.

    Counted as :func:`_output_tiles` makes them: A and B as read; their copies in the
    compute dtype where it differs; A with the scale folded in; a loralib B spread
    over its groups; DoRA's magnitudes; a combination's intermediates
    (``working_bytes``); trainable tokens' rows; a re-quantized weight's block
    scales and the tiles it joins. Small tensors (biases) are read whole, in a few forms.
    """
    spec, delta = tensor.spec, tensor.delta
    elements = math.prod(spec.shape)
    if isinstance(delta, LoraBias) or len(spec.shape) < 2 or tensor.source == "zeros":
        return 4 * 8 * elements
    held = 0
    if tensor.token_rows is not None:
        key = tensor.token_rows.key
        held += adapter.dtype(key).itemsize * math.prod(adapter.shape(key))
    target = tensor.requantize
    if target is not None:  # the weight's block scales, and a tile joined with the remainder
        held += 2 * 4 * target.blocks + 2 * tile_budget
    if isinstance(delta, LoraProduct):
        output_dtype = spec.dtype if target is None else target.dtype
        compute = torch.float64 if delta.norm_per_column else compute_dtype_for(output_dtype)
        held += _factor_bytes(delta, adapter, compute, tile_budget)
    return held


def _factor_bytes(
    delta: LoraProduct, adapter: TensorSource, compute: torch.dtype, tile_budget: int
) -> int:
    """A LoRA product's factors in every form :func:`_output_tiles` holds them at once."""
    a_dtype, a_elements = adapter.dtype(delta.a_key), math.prod(adapter.shape(delta.a_key))
    held = a_dtype.itemsize * a_elements
    if a_dtype != compute or delta.experts > 1:  # experts: each one's A is a copy
        held += compute.itemsize * a_elements
    mantissa, _ = math.frexp(delta.scale)
    if abs(delta.scale) >= 1.0 and abs(mantissa) == 0.5:  # the scale folded into A
        held += compute.itemsize * a_elements
    if not delta.dense:
        b_dtype, b_elements = adapter.dtype(delta.b_key), math.prod(adapter.shape(delta.b_key))
        held += b_dtype.itemsize * b_elements
        if delta.groups is not None:  # B spread over every group's rows
            b_elements *= len(delta.groups)
            held += b_dtype.itemsize * b_elements
        if b_dtype != compute or delta.experts > 1:
            held += compute.itemsize * b_elements
    if delta.experts > 1:  # a tile of whole experts, merged apart from the buffers
        held += tile_budget
    if delta.magnitude_key is not None:
        magnitude = math.prod(adapter.shape(delta.magnitude_key))
        held += (adapter.dtype(delta.magnitude_key).itemsize + compute.itemsize) * magnitude
    if isinstance(adapter, CombinedAdapter):  # it computes the factors when first read
        held += adapter.working_bytes(delta.a_key)
    return held


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
        nbytes = dtype_itemsize(dtype) * int(torch.Size(shape).numel())
        if nbytes > self._output.numel():  # a single row wider than a tile
            self._output = torch.empty(nbytes, dtype=torch.uint8)
        return self._output[:nbytes].view(dtype).view(shape)


def write_shard(
    path: Path,
    tensors: Sequence[PlannedTensor],
    base: StoredTensorSource,
    adapter: TensorSource,
    device: torch.device,
    tile_budget: int,
    on_bytes: Callable[[int], None],
    allow_nonfinite: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one output shard.

    On the CPU, tensors are spread over one thread per core, each running torch
    single-threaded on its own cache-sized tiles, so one core's reads and
    writes overlap the other's arithmetic. On a GPU one thread feeds it.

    Args:
        path: the shard file to create.
        tensors: its tensors, in order.
        base: reader of the base checkpoint.
        adapter: the adapter's tensors.
        device: where the merge arithmetic runs.
        tile_budget: bytes of merge workspace one tile may use (see :func:`tile_budget_for`).
        on_bytes: called with the number of output bytes after each write (progress);
            it may be called from several threads.
        allow_nonfinite: write NaN/Inf produced by the merge instead of refusing
            (tensors copied unchanged from the base are never inspected).
        metadata: the header's ``__metadata__`` (default: just the format).

    Raises:
        NonFiniteError: a merged, replaced or converted tensor has NaN or Inf.
    """
    workers = stream_workers(device)
    with (
        ShardWriter(path, [t.spec for t in tensors], metadata) as writer,
        _single_threaded_torch(workers > 1),
    ):
        stop = threading.Event()
        per_thread = threading.local()

        # A 4-bit group's scales and quant state are written with its weight.
        work = [t for t in tensors if t.spec.nbytes and t.written_with is None]

        def write_tensor(index: int) -> None:
            if stop.is_set():
                return
            tensor = work[index]
            # The tensor the next free thread takes after this batch: have the disk read it now.
            upcoming = index + workers
            if upcoming < len(work) and work[upcoming].source == "base":
                base.prefetch(work[upcoming].source_key)
            slot = writer.tensor(tensor.spec.name)
            if tensor.is_byte_copy:
                on_bytes(slot.copy_from(base, tensor.source_key))
                return
            source: TensorSource = base if tensor.source == "base" else adapter
            if not hasattr(per_thread, "buffers"):
                per_thread.buffers = TileBuffers(tile_budget)
            if tensor.requantize is not None:  # merged_4bit: the weight and its 4-bit group
                target = tensor.requantize
                merged = replace(
                    tensor,
                    spec=TensorSpec(tensor.spec.name, target.dtype, target.shape),
                    requantize=None,
                )
                write_requantized(
                    checked_tiles(merged, source, per_thread.buffers),
                    target,
                    tensor.spec.name,
                    writer,
                    on_bytes,
                )
                return
            for tile in checked_tiles(tensor, source, per_thread.buffers):
                on_bytes(slot.write(tile))

        def checked_tiles(
            tensor: PlannedTensor, source: TensorSource, buffers: TileBuffers
        ) -> Iterator[torch.Tensor]:
            """The tensor's output tiles (trainable-token rows in place), refusing NaN/Inf unless
            allowed; cut short once ``stop`` is set (the run is failing or interrupted, and its
            output will be removed)."""
            tiles = _output_tiles(tensor, source, adapter, device, buffers)
            if tensor.token_rows is not None:
                tiles = _with_token_rows(tiles, tensor.token_rows, adapter)
            for tile in tiles:
                if not allow_nonfinite and not all_finite(tile):
                    raise NonFiniteError(_nonfinite_message(tensor, adapter))
                yield tile
                if stop.is_set():
                    return

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-merge") as pool:
            try:
                for _ in pool.map(write_tensor, range(len(work))):
                    pass
            except BaseException:
                stop.set()  # Ctrl-C or a failure: the other threads stop at their next tile
                pool.shutdown(cancel_futures=True)
                raise


@contextmanager
def _single_threaded_torch(enabled: bool) -> Iterator[None]:
    """Run torch ops single-threaded inside the block (our threads are the parallelism)."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(previous)


def _nonfinite_message(tensor: PlannedTensor, adapter: TensorSource) -> str:
    """Say where NaN/Inf in an output tensor came from, and what to do."""
    name, delta = tensor.spec.name, tensor.delta
    suspects = [tensor.source_key] if tensor.source == "adapter" else []
    if isinstance(delta, LoraProduct):
        suspects += [delta.a_key] if delta.dense else [delta.a_key, delta.b_key]
        if delta.magnitude_key is not None:
            suspects.append(delta.magnitude_key)
    elif isinstance(delta, LoraBias):
        suspects.append(delta.bias_key)
    if tensor.token_rows is not None:
        suspects.append(tensor.token_rows.key)
    broken = [key for key in suspects if not all_finite(adapter.read_rows(key))]
    if broken:
        cause = f"adapter tensor {broken[0]!r} contains NaN or Inf: the adapter is broken"
    elif delta is not None:
        cause = (
            f"merging into {name!r} produced NaN or Inf: the base tensor holds NaN/Inf or "
            f"the sum overflows {tensor.spec.dtype}"
        )
    else:
        cause = f"converting {name!r} to {tensor.spec.dtype} produced NaN or Inf (values out of its range)"
    return f"{cause}; refusing to write it (pass --allow-nonfinite to write it anyway)"


def _with_token_rows(
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


def _output_tiles(
    tensor: PlannedTensor,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    buffers: TileBuffers,
) -> Iterator[torch.Tensor]:
    """The output tensor's values, as consecutive row tiles in CPU buffers from ``buffers``."""
    spec, delta = tensor.spec, tensor.delta
    if isinstance(delta, LoraBias) or not spec.shape or tensor.source == "zeros":
        # Biases and scalars are small: one piece, in fresh memory.
        if tensor.source == "zeros":  # a bias the base lacks (see MergePlan)
            values = torch.zeros(spec.shape, dtype=spec.dtype)
        else:
            values = source.read_rows(tensor.source_key)
        if isinstance(delta, LoraBias):
            lora_bias = adapter.read_rows(delta.bias_key).to(device)
            yield merge_lora_bias(values.to(device), lora_bias, delta.scale, spec.dtype).cpu()
        else:
            yield values.to(spec.dtype)
        return

    rows = spec.shape[0]
    row_shape = spec.shape[1:]
    row_elements = max(1, int(torch.Size(row_shape).numel()))
    widest = max(dtype_itemsize(tensor.source_dtype), dtype_itemsize(spec.dtype))
    if isinstance(delta, LoraProduct):
        compute_dtype = compute_dtype_for(spec.dtype)
        if delta.norm_per_column:
            # DoRA over columns cannot reproduce PEFT's float32 norm (its sum runs in
            # another order), so it is computed in float64 throughout: correctly
            # rounded, never further from the exact result than PEFT's.
            compute_dtype = torch.float64
        widest = max(widest, dtype_itemsize(compute_dtype))
    tile_rows = max(1, buffers.tile_bytes // (row_elements * widest))

    if not isinstance(delta, LoraProduct):
        # A dtype conversion, or an adapter tensor replacing the base's.
        for start in range(0, rows, tile_rows):
            stop = min(rows, start + tile_rows)
            values = source.read_rows(tensor.source_key, start, stop, buffers.read)
            yield buffers.output(spec.dtype, tuple(values.shape)).copy_(values)
        return

    if delta.experts > 1 and delta.expert is None:
        yield from _fused_expert_tiles(tensor, delta, source, adapter, device, buffers, tile_rows)
        return
    lora_a, lora_b = (
        None if matrix is None else matrix.to(device) for matrix in _lora_matrices(delta, adapter)
    )
    assert lora_a is not None
    rank = lora_a.shape[0]
    # Convolutions: A (r, in, *kernel) and B (out, r, 1, ...) as 2-D matrices, and
    # each output channel as one flat row: PEFT's ``B.view(-1, r) @ A.view(r, -1)``.
    # (A whole delta, ``dense``, is already (out, in).)
    factors = prepare_lora_factors(
        lora_a.reshape(rank, -1),
        None if lora_b is None else lora_b.reshape(-1, rank),
        delta.scale,
        delta.transposed,
        compute_dtype,
    )
    out_features = factors.lora_a.shape[0] if factors.lora_b is None else factors.lora_b.shape[0]
    workspace_rows = out_features if delta.transposed else tile_rows
    workspace_columns = tile_rows if delta.transposed else factors.lora_a.shape[1]
    workspace = torch.empty((workspace_rows, workspace_columns), dtype=compute_dtype, device=device)
    magnitude = None
    if delta.magnitude_key is not None:
        magnitude = adapter.read_rows(delta.magnitude_key).reshape(-1)
        magnitude = magnitude.to(device=device, dtype=compute_dtype)

    def tile_values(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows start:stop, and V = W + scale * B @ A over them (flat rows)."""
        values = source.read_rows(tensor.source_key, start, stop, buffers.read).to(device)
        count = stop - start
        tile_workspace = workspace[:, :count] if delta.transposed else workspace[:count]
        return values, merged_rows(values.reshape(count, -1), factors, start, tile_workspace)

    column_factor = None
    if delta.norm_per_column:
        assert magnitude is not None
        # First pass: the norm of each column spans every row, so sum its squares
        # tile by tile; only a vector as long as a row is kept.
        sums = torch.zeros(row_elements, dtype=torch.float64, device=device)
        for start in range(0, rows, tile_rows):
            sums += column_sums_of_squares(tile_values(start, min(rows, start + tile_rows))[1])
        column_factor = dora_column_factor(magnitude, sums)

    on_cpu = device.type == "cpu"
    for start in range(0, rows, tile_rows):
        stop = min(rows, start + tile_rows)
        values, merged = tile_values(start, stop)
        if column_factor is not None:
            merged = dora_scale_columns(merged, column_factor)
        elif magnitude is not None:
            dora_scale_rows(merged, magnitude[start:stop])
        if merged.dtype == torch.float64 and spec.dtype.itemsize == 2:
            merged = round_float64_to(merged, spec.dtype)
        # The one rounding: a copy of the float32/float64 sum into the output dtype.
        # (Two kernels, add then copy, rather than one ``torch.add(..., out=<16-bit>)``:
        # that mixed-dtype form is ~6x slower on CPU, 2.2 vs 0.37 ns per element
        # measured, and gives the same bits.)
        out = buffers.output(spec.dtype, tuple(values.shape))
        if on_cpu:
            yield out.view(stop - start, -1).copy_(merged).view(values.shape)
        else:
            yield out.view(stop - start, -1).copy_(merged.to(spec.dtype).cpu()).view(values.shape)


def _lora_matrices(
    delta: LoraProduct, adapter: TensorSource
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A and B such that the product's delta is a plain ``scale * B @ A`` (no B: dense).

    For a loralib MergedLinear, B is spread over its groups' rows. For one
    expert's weight, only the expert's rows of A are read (they are consecutive)
    and only the rows of B this weight takes (``b_rows``); its columns are then
    selected.
    """
    if delta.dense:  # A is the whole delta; there is no B
        return adapter.read_rows(delta.a_key), None
    if delta.groups is not None:  # loralib MergedLinear
        lora_b = expand_merged_linear_b(adapter.read_rows(delta.b_key), delta.groups)
        return adapter.read_rows(delta.a_key), lora_b
    if delta.expert is None:
        return adapter.read_rows(delta.a_key), adapter.read_rows(delta.b_key)
    rank = adapter.shape(delta.a_key)[0] // delta.experts
    start = delta.expert * rank
    lora_a = adapter.read_rows(delta.a_key, start, start + rank)
    lora_b = adapter.read_rows(delta.b_key, *(delta.b_rows or (0, None)))
    return expert_lora_factors(lora_a, lora_b, delta.expert, delta.experts)


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
    lora_a = adapter.read_rows(delta.a_key).to(device)
    lora_b = adapter.read_rows(delta.b_key).to(device)
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
            # The one rounding, as for every other weight (see _output_tiles).
            out[index].copy_(merged_rows(values[index], factors, 0))
        yield buffers.output(spec.dtype, tuple(values.shape)).copy_(out.cpu())
