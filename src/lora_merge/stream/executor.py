"""Run a merge plan: stream every output tensor from its source into its shard.

Untouched tensors whose dtype does not change are copied as bytes. Every other
tensor is processed in row chunks sized from the memory budget, so no step ever
holds more than a chunk of a large tensor, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lora_merge.compute.lora import compute_dtype_for, merge_lora_bias, merge_lora_rows
from lora_merge.io.reader import SafetensorsReader, TensorSource
from lora_merge.io.safetensors_format import dtype_itemsize
from lora_merge.io.shard_writer import ShardWriter
from lora_merge.plan.planner import LoraBias, LoraProduct, PlannedTensor


def write_shard(
    path: Path,
    tensors: Sequence[PlannedTensor],
    base: SafetensorsReader,
    adapter: TensorSource,
    device: torch.device,
    chunk_budget: int,
    on_bytes: Callable[[int], None],
) -> None:
    """Write one output shard.

    Args:
        path: the shard file to create.
        tensors: its tensors, in order.
        base: reader of the base checkpoint.
        adapter: the adapter's tensors.
        device: where the merge arithmetic runs.
        chunk_budget: bytes of working memory one chunk may use.
        on_bytes: called with the number of output bytes after each write (progress).
    """
    with ShardWriter(path, [t.spec for t in tensors]) as writer:
        for tensor in tensors:
            if tensor.spec.nbytes == 0:
                continue
            if tensor.is_byte_copy:
                on_bytes(base.copy_bytes(tensor.source_key, writer.handle))
                writer.append_raw(tensor.spec.nbytes)
                continue
            source: TensorSource = base if tensor.source == "base" else adapter
            for chunk in _merged_chunks(tensor, source, adapter, device, chunk_budget):
                writer.write(chunk)
                on_bytes(chunk.numel() * chunk.element_size())


def _merged_chunks(
    tensor: PlannedTensor,
    source: TensorSource,
    adapter: TensorSource,
    device: torch.device,
    chunk_budget: int,
):
    spec = tensor.spec
    delta = tensor.delta
    if isinstance(delta, LoraBias) or not spec.shape:
        # Biases and scalars are small: one piece.
        values = source.read_rows(tensor.source_key)
        if isinstance(delta, LoraBias):
            lora_bias = adapter.read_rows(delta.bias_key)
            yield merge_lora_bias(
                values.to(device), lora_bias.to(device), delta.scale, spec.dtype
            ).cpu()
        else:
            yield values.to(spec.dtype)
        return

    rows = spec.shape[0]
    row_elements = spec.nbytes // dtype_itemsize(spec.dtype) // rows if rows else 0
    lora_a = lora_b = None
    working_bytes_per_element = dtype_itemsize(tensor.source_dtype) + dtype_itemsize(spec.dtype)
    if isinstance(delta, LoraProduct):
        lora_a = adapter.read_rows(delta.a_key).to(device)
        lora_b = adapter.read_rows(delta.b_key).to(device)
        # the delta accumulator, and the source rows converted to its dtype
        working_bytes_per_element += 2 * dtype_itemsize(compute_dtype_for(spec.dtype))
    rows_per_chunk = max(1, chunk_budget // max(1, row_elements * working_bytes_per_element))
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        values = source.read_rows(tensor.source_key, start, stop)
        if isinstance(delta, LoraProduct):
            assert lora_a is not None and lora_b is not None
            merged = merge_lora_rows(
                values.to(device),
                lora_a,
                lora_b,
                delta.scale,
                delta.transposed,
                start,
                stop,
                spec.dtype,
            )
            yield merged.cpu()
        else:
            yield values.to(spec.dtype)
