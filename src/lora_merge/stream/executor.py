"""Run a merge plan: stream every output tensor from its source into its shard.

Untouched tensors whose dtype does not change are copied as bytes, in the
kernel. Every other tensor is processed in row tiles (:mod:`.tiles`): read a
tile, merge it, write it, move on. Measured on a TinyLlama-shaped merge
(2 cores): whole-tensor passes were 5x slower than cache-sized tiles, fresh
buffers per tile cost as much again in page faults, and a background writer
thread made things slower (it fights the math for the two cores and pulls every
tile across caches); instead whole tensors are spread over one thread per core,
each reading, merging and writing its own tiles. No thread ever holds more than
one tile of a tensor, so memory does not grow with the model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from lora_merge.compute.lora import all_finite, compute_dtype_for, scale_folds_into_a
from lora_merge.dtypes import dtype_of
from lora_merge.errors import NonFiniteError
from lora_merge.io.dequantizing_reader import dequantize_workspace_bound
from lora_merge.io.reader import StoredTensorSource, TensorSource
from lora_merge.io.shard_writer import ShardWriter, TensorSpec
from lora_merge.plan.kinds.dora import norm_per_column
from lora_merge.plan.model import LoraBias, LoraProduct, PlannedTensor, TunerUpdate
from lora_merge.plan.tuners.rows import tuner_compute_dtype, tuner_delta_bytes
from lora_merge.stream.tile_buffers import TileBuffers
from lora_merge.stream.tiles import output_tiles, tile_row_elements, with_token_rows

# Bytes of merge workspace (the float32/float64 accumulator) per CPU tile. With
# the rows read and the rows written it stays within a 2 MiB L2 cache.
CPU_TILE_WORKSPACE_BYTES = 2**19


# Workspaces' worth of rows each CPU thread reads and writes per tile of a LoRA product
# (see TileBuffers): the reads, writes and Python per tile are paid once per that many
# cache-sized blocks of arithmetic.
CPU_TILE_IO_BLOCKS = 4


def tile_io_bytes(device: torch.device, tile_budget: int) -> int:
    """Bytes of each tile buffer (rows read, rows written): several workspaces on the CPU."""
    return tile_budget * CPU_TILE_IO_BLOCKS if device.type == "cpu" else tile_budget


def tile_budget_for(device: torch.device, memory_budget: int) -> int:
    """Workspace bytes per tile: cache-sized on the CPU, budget-sized on a GPU."""
    if device.type == "cpu":
        return min(CPU_TILE_WORKSPACE_BYTES, memory_budget)
    return memory_budget // 4


def stream_workers(device: torch.device, threads: int) -> int:
    """Threads that write a shard's tensors at once: ``threads`` on the CPU (see
    :func:`lora_merge.io.cpus.usable_cpu_count` for the default), one feeding a GPU."""
    return threads if device.type == "cpu" else 1


def working_memory_bound(
    shards: Iterable[Sequence[PlannedTensor]],
    adapter: TensorSource,
    device: torch.device,
    tile_budget: int,
    threads: int,
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
        threads: CPU threads that merge at once.
    """
    workers = stream_workers(device, threads)
    shard_lists = [list(tensors) for tensors in shards]
    # A row wider than a tile makes every buffer one row long instead (a fused expert
    # weight's row, a whole expert, is read in bands of its own rows: one of those).
    widest_row = max(
        (
            8 * tile_row_elements(t, tile_budget)
            for tensors in shard_lists
            for t in tensors
            if len(t.spec.shape) > 1
        ),
        default=0,
    )
    # The rows read, the rows written, and the workspace.
    per_thread = 2 * max(tile_io_bytes(device, tile_budget), widest_row)
    per_thread += max(tile_budget, widest_row)
    if any(t.dequantized for tensors in shard_lists for t in tensors):
        # A quantized base: each thread's dequantization workspace (see DequantizingReader).
        # A tile holds at most tile_budget / 2 weights (16-bit rows), or one row; a weight
        # read in bands keeps its whole row packed.
        tile_elements = max(tile_budget // 2, widest_row // 8)
        banded_row = max(
            (
                math.prod(t.spec.shape[1:])
                for tensors in shard_lists
                for t in tensors
                if t.dequantized
                and len(t.spec.shape) > 2
                and tile_row_elements(t, tile_budget) < math.prod(t.spec.shape[1:])
            ),
            default=0,
        )
        per_thread += dequantize_workspace_bound(tile_elements, device, banded_row)
    in_flight = 0
    for tensors in shard_lists:
        held = sorted(
            (_tensor_bytes(t, adapter, tile_budget) for t in tensors if t.written_with is None),
            reverse=True,
        )
        in_flight = max(in_flight, sum(held[:workers]))
    # What the adapter holds whatever the threads read: a pickled adapter loaded whole, a
    # combination's last module for each thread.
    return workers * per_thread + in_flight + adapter.held_bytes(workers)


def _tensor_bytes(tensor: PlannedTensor, adapter: TensorSource, tile_budget: int) -> int:
    """What one thread holds whole, beyond its tile buffers, while it writes ``tensor``.

    Counted as :func:`lora_merge.stream.tiles.output_tiles` makes them: A and B as read; their copies in the
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
    if target is not None:  # e.g. the weight's block scales, a tile joined with the remainder
        held += target.held_bytes(tile_budget)
    if isinstance(delta, LoraProduct):
        output_dtype = spec.dtype.torch if target is None else target.dtype
        compute = torch.float64 if norm_per_column(delta) else compute_dtype_for(output_dtype)
        # Fused experts read in bands read their factors one expert at a time.
        banded = tile_row_elements(tensor, tile_budget) < math.prod(spec.shape[1:])
        held += _factor_bytes(delta, adapter, compute, tile_budget, banded)
    elif isinstance(delta, TunerUpdate):  # AdaLoRA, IA3, LoHa, LoKr
        compute = tuner_compute_dtype(delta, spec.dtype.torch)
        held += tuner_delta_bytes(delta, adapter, spec.shape, compute)
    return held


def _factor_bytes(
    delta: LoraProduct,
    adapter: TensorSource,
    compute: torch.dtype,
    tile_budget: int,
    one_expert: bool = False,
) -> int:
    """A LoRA product's factors in every form :func:`lora_merge.stream.tiles.output_tiles` holds
    them at once (``one_expert``: fused experts' factors read one expert at a time)."""
    a_dtype, a_elements = adapter.dtype(delta.a_key), math.prod(adapter.shape(delta.a_key))
    experts_read = delta.experts if one_expert else 1
    a_elements //= experts_read
    held = a_dtype.itemsize * a_elements
    if a_dtype.torch != compute or delta.experts > 1:  # experts: each one's A is a copy
        held += compute.itemsize * a_elements
    if scale_folds_into_a(delta.scale):
        held += compute.itemsize * a_elements
    if not delta.dense:
        b_dtype, b_elements = adapter.dtype(delta.b_key), math.prod(adapter.shape(delta.b_key))
        b_elements //= experts_read
        held += b_dtype.itemsize * b_elements
        if delta.groups is not None:  # B spread over every group's rows
            b_elements *= len(delta.groups)
            held += b_dtype.itemsize * b_elements
        if b_dtype.torch != compute or delta.experts > 1:
            held += compute.itemsize * b_elements
    if delta.experts > 1:  # a tile of whole experts, merged apart from the buffers
        held += tile_budget
    if delta.magnitude_key is not None:
        magnitude = math.prod(adapter.shape(delta.magnitude_key))
        held += (adapter.dtype(delta.magnitude_key).itemsize + compute.itemsize) * magnitude
    # A combination computes the factors when first read (other sources: 0).
    held += adapter.working_bytes(delta.a_key)
    return held


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
    threads: int = 1,
    written: Collection[str] = (),
) -> None:
    """Write one output shard.

    On the CPU, tensors are spread over ``threads`` threads, each running torch
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
        threads: CPU threads that merge at once (``--threads``).
        written: tensors already in the file under this shard's header (copied ahead,
            see :mod:`lora_merge.run.copy_ahead`): skipped, and counted in ``on_bytes``.

    Raises:
        NonFiniteError: a merged, replaced or converted tensor has NaN or Inf.
    """
    workers = stream_workers(device, threads)
    with (
        ShardWriter(path, [t.spec for t in tensors], metadata, written) as writer,
        # Even one thread keeps torch to one core: --threads N means N cores busy.
        _single_threaded_torch(device.type == "cpu"),
    ):
        # A 4-bit group's scales and quant state are written with its weight.
        work = [
            t
            for t in tensors
            if t.spec.nbytes and t.written_with is None and t.spec.name not in written
        ]
        if written:
            on_bytes(sum(t.spec.nbytes for t in tensors if t.spec.name in written))
        job = _ShardJob(
            writer, work, base, adapter, device, tile_budget, on_bytes, allow_nonfinite, workers
        )
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-merge") as pool:
            try:
                for _ in pool.map(job.write_tensor, range(len(work))):
                    pass
            except BaseException:
                job.stop.set()  # Ctrl-C or a failure: the other threads stop at their next tile
                pool.shutdown(cancel_futures=True)
                raise


class _ShardJob:
    """The tensors of one shard, written by a pool of threads, each with its own tile buffers."""

    def __init__(
        self,
        writer: ShardWriter,
        work: list[PlannedTensor],
        base: StoredTensorSource,
        adapter: TensorSource,
        device: torch.device,
        tile_budget: int,
        on_bytes: Callable[[int], None],
        allow_nonfinite: bool,
        workers: int,
    ) -> None:
        self.writer, self.work, self.base, self.adapter = writer, work, base, adapter
        self.device, self.tile_budget, self.on_bytes = device, tile_budget, on_bytes
        self.allow_nonfinite, self.workers = allow_nonfinite, workers
        # Set when the run is failing or interrupted: its output will be removed.
        self.stop = threading.Event()
        self._per_thread = threading.local()

    def write_tensor(self, index: int) -> None:
        """Write ``work[index]`` (in a pool thread)."""
        if self.stop.is_set():
            return
        tensor = self.work[index]
        # The tensor the next free thread takes after this batch: have the disk read it now.
        upcoming = index + self.workers
        if upcoming < len(self.work) and self.work[upcoming].source == "base":
            self.base.prefetch(self.work[upcoming].source_key)
        slot = self.writer.tensor(tensor.spec.name)
        if tensor.is_byte_copy:
            self.on_bytes(slot.copy_from(self.base, tensor.source_key))
            return
        if tensor.requantize is not None:  # merged_4bit/native: the weight and its group
            target = tensor.requantize
            merged = replace(
                tensor,
                spec=TensorSpec(tensor.spec.name, dtype_of(target.dtype), target.shape),
                requantize=None,
            )
            tiles = self._checked_tiles(merged, io_sized=False)
            target.write(tiles, tensor.spec.name, self.writer, self.on_bytes)
            return
        for tile in self._checked_tiles(tensor, io_sized=True):
            self.on_bytes(slot.write(tile))

    def _checked_tiles(self, tensor: PlannedTensor, io_sized: bool) -> Iterator[torch.Tensor]:
        """The tensor's output tiles (trainable-token rows in place), refusing NaN/Inf unless
        allowed; cut short once ``stop`` is set. ``io_sized``: see :func:`output_tiles`."""
        if not hasattr(self._per_thread, "buffers"):
            self._per_thread.buffers = TileBuffers(
                self.tile_budget, tile_io_bytes(self.device, self.tile_budget)
            )
        source: TensorSource = self.base if tensor.source == "base" else self.adapter
        buffers = self._per_thread.buffers
        tiles = output_tiles(tensor, source, self.adapter, self.device, buffers, io_sized)
        if tensor.token_rows is not None:
            tiles = with_token_rows(tiles, tensor.token_rows, self.adapter)
        for tile in tiles:
            if not (self.allow_nonfinite or tile.finite or all_finite(tile.values)):
                raise NonFiniteError(_nonfinite_message(tensor, self.adapter))
            yield tile.values
            if self.stop.is_set():
                return


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
    elif isinstance(delta, TunerUpdate):
        suspects += [key for _, key in delta.keys]
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
