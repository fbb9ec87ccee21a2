"""A shard's work cut into small tasks, handed out in file order to the stream's threads.

Every thread takes the next task when it finishes one: a row tile of a merged or
converted weight, a piece of a copied one, or (for the few kinds whose tiles
depend on each other) a whole tensor. Tasks follow the plan, which follows the
base's file order, so the base's bytes are read nearly in order, a few tiles
apart: that is what lets provenance hash them as they pass
(:class:`~lora_merge.io.hashing.InOrderHasher`), and it keeps both cores busy to
the end of a shard instead of leaving one to finish a large tensor alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_merge.compute.lora import all_finite, all_finite_bits
from lora_merge.errors import NonFiniteError
from lora_merge.io.hashing import InOrderHasher
from lora_merge.io.reader import StoredTensorSource, TensorSource
from lora_merge.io.shard_writer import ShardWriter, TensorSlot, TensorSpec
from lora_merge.plan.model import LoraBias, LoraProduct, PlannedTensor
from lora_merge.stream.requantize import write_requantized
from lora_merge.stream.tiles import (
    ConvertedRows,
    ProductRows,
    TileBuffers,
    independent_row_tiles,
    output_tiles,
    with_token_rows,
)

# A copied tensor whose file is hashed on the way goes in pieces of this size, so
# that both threads share it and its bytes reach the hasher in order.
HASHED_COPY_PIECE_BYTES = 4 * 2**20
# Consecutive tiles one task computes: fewer tasks to hand out (each costs Python
# time), still small enough that the other thread's early bytes fit the hasher's
# reorder window.
TILES_PER_TASK = 4


@dataclass(frozen=True)
class _Task:
    """One unit of work: ``run`` writes its bytes and returns how many.

    ``hasher`` and ``source_start`` say which base file it reads and from where,
    so that bytes no task will hand over can be hashed from the file in time.
    """

    run: Callable[[TileBuffers], int]
    hasher: InOrderHasher | None = None
    source_start: int = 0
    source_end: int = 0


class ShardTasks:
    """The tensors of one shard, as tasks that a pool of threads takes in order.

    Args:
        writer: the open shard.
        work: its tensors to write, in order.
        base: reader of the base checkpoint.
        adapter: the adapter's tensors.
        device: where the merge arithmetic runs.
        tile_budget: bytes of merge workspace one tile may use.
        on_bytes: progress, called with the bytes each task wrote (from any thread).
        allow_nonfinite: write NaN/Inf instead of refusing.
        hashers: base files' hashers, fed by ``base`` as it reads (see
            :meth:`lora_merge.io.reader.SafetensorsReader.hash_while_reading`).
    """

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
        hashers: Mapping[Path, InOrderHasher],
    ) -> None:
        self.writer, self.work, self.base, self.adapter = writer, work, base, adapter
        self.device, self.tile_budget, self.on_bytes = device, tile_budget, on_bytes
        self.allow_nonfinite, self.hashers = allow_nonfinite, hashers
        # Set when the run is failing or interrupted: its output will be removed.
        self.stop = threading.Event()
        self._lock = threading.Lock()  # guards the task iterator and what is in flight
        self._tasks = self._all_tasks()
        self._in_flight: dict[int, _Task] = {}
        self._handed_out_to: dict[InOrderHasher, int] = {}

    def run_worker(self) -> None:
        """Take and run tasks until there are none left or ``stop`` is set (a pool thread)."""
        buffers = TileBuffers(self.tile_budget)
        while not self.stop.is_set():
            task = self._next_task()
            if task is None:
                return
            try:
                self.on_bytes(task.run(buffers))
            finally:
                self._task_done(task)

    def _next_task(self) -> _Task | None:
        with self._lock:
            task = next(self._tasks, None)
            if task is not None:
                self._in_flight[threading.get_ident()] = task
                if task.hasher is not None:
                    self._handed_out_to[task.hasher] = task.source_end
            return task

    def _task_done(self, task: _Task) -> None:
        """Forget a finished task; hash from the file what no task will hand over any more."""
        with self._lock:
            del self._in_flight[threading.get_ident()]
            if task.hasher is None:
                return
            starts = [t.source_start for t in self._in_flight.values() if t.hasher is task.hasher]
            done_below = min(starts, default=self._handed_out_to[task.hasher])
        # Bytes below every task in flight were dropped from the reorder window (or never
        # read): read them now, while they are cached, unless another thread is hashing.
        task.hasher.fill_to(done_below, wait=False)

    def _all_tasks(self) -> Iterator[_Task]:
        """Every task of the shard, in order (runs under ``_lock``, one step per task)."""
        for index, tensor in enumerate(self.work):
            if index + 1 < len(self.work) and self.work[index + 1].source == "base":
                # Have the disk read the next tensor while this one's tasks run.
                self.base.prefetch(self.work[index + 1].source_key)
            slot = self.writer.tensor(tensor.spec.name)
            if tensor.is_byte_copy:
                yield from self._copy_tasks(tensor, slot)
                continue
            rows = None
            if (
                self.device.type == "cpu"
                and tensor.token_rows is None
                and tensor.requantize is None
            ):
                source = self._source(tensor)
                rows = independent_row_tiles(
                    tensor, source, self.adapter, self.device, self.tile_budget
                )
            if rows is None:
                yield self._located(tensor, 0, None, self._whole_task(tensor, slot))
            else:
                yield from self._tile_tasks(tensor, rows, slot)

    def _copy_tasks(self, tensor: PlannedTensor, slot: TensorSlot) -> Iterator[_Task]:
        """A copied tensor: in pieces when its file is hashed, else whole (in the kernel)."""
        key = tensor.source_key
        entry = self.base.entry(key)
        if self.hashers.get(entry.path) is None:
            yield _Task(lambda _: slot.copy_from(self.base, key))
            return
        for start in range(0, entry.nbytes, HASHED_COPY_PIECE_BYTES):
            count = min(HASHED_COPY_PIECE_BYTES, entry.nbytes - start)
            yield self._located(tensor, start, count, self._copy_piece(slot, key, start, count))

    def _copy_piece(
        self, slot: TensorSlot, key: str, start: int, nbytes: int
    ) -> Callable[[TileBuffers], int]:
        return lambda _: slot.copy_from(self.base, key, start, nbytes)

    def _tile_tasks(
        self, tensor: PlannedTensor, rows: ConvertedRows | ProductRows, slot: TensorSlot
    ) -> Iterator[_Task]:
        """A tensor whose row tiles are independent: one task per :data:`TILES_PER_TASK` tiles."""
        row_elements = math.prod(tensor.spec.shape[1:])
        out_row_bytes = tensor.spec.dtype.itemsize * row_elements
        in_row_bytes = tensor.source_dtype.itemsize * row_elements

        def tiles_task(first: int, last: int) -> Callable[[TileBuffers], int]:
            def run(buffers: TileBuffers) -> int:
                written = 0
                for start in range(first, last, rows.tile_rows):
                    tile = rows.tile(start, min(last, start + rows.tile_rows), buffers)
                    self._check_finite(tile, tensor, buffers.scratch)
                    written += slot.write(tile, start * out_row_bytes)
                return written

            return run

        rows_per_task = rows.tile_rows * TILES_PER_TASK
        for first in range(0, rows.rows, rows_per_task):
            last = min(rows.rows, first + rows_per_task)
            yield self._located(
                tensor, first * in_row_bytes, (last - first) * in_row_bytes, tiles_task(first, last)
            )

    def _located(
        self,
        tensor: PlannedTensor,
        start: int,
        nbytes: int | None,
        run: Callable[[TileBuffers], int],
    ) -> _Task:
        """A task reading ``nbytes`` of ``tensor``'s stored bytes from ``start`` (None: to its end),
        with the hasher of the base file it reads, if any."""
        if tensor.source != "base" or not self.hashers:
            return _Task(run)
        entry = self.base.entry(tensor.source_key)
        hasher = self.hashers.get(entry.path)
        end = entry.nbytes if nbytes is None else start + nbytes
        return _Task(run, hasher, entry.start + start, entry.start + end)

    def _source(self, tensor: PlannedTensor) -> TensorSource:
        return self.base if tensor.source == "base" else self.adapter

    def _whole_task(self, tensor: PlannedTensor, slot: TensorSlot) -> Callable[[TileBuffers], int]:
        return lambda buffers: self._whole(tensor, slot, buffers)

    def _whole(self, tensor: PlannedTensor, slot: TensorSlot, buffers: TileBuffers) -> int:
        """Write a tensor whose tiles depend on each other, front to back, in this thread."""
        written = 0
        if tensor.requantize is not None:  # merged_4bit: the weight and its 4-bit group
            target = tensor.requantize
            merged = replace(
                tensor,
                spec=TensorSpec(tensor.spec.name, target.dtype, target.shape),
                requantize=None,
            )
            tiles = self._checked_tiles(merged, buffers)
            write_requantized(tiles, target, tensor.spec.name, self.writer, self.on_bytes)
            return 0
        for tile in self._checked_tiles(tensor, buffers):
            written += slot.write(tile)
        return written

    def _checked_tiles(self, tensor: PlannedTensor, buffers: TileBuffers) -> Iterator[torch.Tensor]:
        """The tensor's output tiles (trainable-token rows in place), refusing NaN/Inf unless
        allowed; cut short once ``stop`` is set."""
        tiles = output_tiles(tensor, self._source(tensor), self.adapter, self.device, buffers)
        if tensor.token_rows is not None:
            tiles = with_token_rows(tiles, tensor.token_rows, self.adapter)
        for tile in tiles:
            self._check_finite(tile, tensor)
            yield tile
            if self.stop.is_set():
                return

    def _check_finite(
        self, tile: torch.Tensor, tensor: PlannedTensor, scratch: torch.Tensor | None = None
    ) -> None:
        """Refuse NaN/Inf in an output tile, unless allowed (then nothing is inspected)."""
        if not self.allow_nonfinite and not all_finite_bits(tile, scratch):
            raise NonFiniteError(_nonfinite_message(tensor, self.adapter))


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
