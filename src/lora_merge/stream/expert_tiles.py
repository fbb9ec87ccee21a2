"""The tiles of a fused (E, X, Y) expert weight (gpt-oss, transformers' fused MoE
experts) with a LoRA per expert: whole experts at a time, or bands of an expert's rows
where one expert is wider than a tile (an MXFP4 or FP8 expert read in bands).

Each expert's delta is an ordinary 2-D LoRA product
(:func:`lora_merge.plan.kinds.experts.expert_lora_factors`), merged with
:func:`lora_merge.compute.lora.merged_rows` and rounded once, as
:mod:`lora_merge.stream.tiles` merges every other weight; it picks between the two
functions here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lora_merge.compute.lora import compute_dtype_for, merged_rows, prepare_lora_factors
from lora_merge.io.reader import SubrowSource, TensorSource
from lora_merge.plan.kinds.experts import expert_lora_factors
from lora_merge.plan.kinds.factors import read_lora_factors
from lora_merge.plan.model import LoraProduct, PlannedTensor
from lora_merge.stream.tile_buffers import TileBuffers


def fused_expert_tiles(
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
    compute_dtype = compute_dtype_for(spec.dtype.torch)
    lora_a, lora_b = read_lora_factors(delta, adapter)
    assert lora_b is not None
    lora_a, lora_b = lora_a.to(device), lora_b.to(device)
    experts = spec.shape[0]
    for start in range(0, experts, tile_experts):
        stop = min(experts, start + tile_experts)
        values = source.read_rows(tensor.source_key, start, stop, buffers.read).to(device)
        out = torch.empty(values.shape, dtype=spec.dtype.torch, device=device)
        for index in range(stop - start):
            lora_a_e, lora_b_e = expert_lora_factors(lora_a, lora_b, start + index, experts)
            factors = prepare_lora_factors(
                lora_a_e, lora_b_e, delta.scale, delta.transposed, compute_dtype
            )
            # The one rounding, as for every other weight (see _ProductRows.tiles).
            out[index].copy_(merged_rows(values[index], factors, 0))
        yield buffers.output(spec.dtype.torch, tuple(values.shape)).copy_(out.cpu())


def fused_expert_bands(
    tensor: PlannedTensor,
    delta: LoraProduct,
    source: SubrowSource,
    adapter: TensorSource,
    device: torch.device,
    buffers: TileBuffers,
    band: int,
    compute_dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Tiles of a fused (E, X, Y) expert weight whose expert is wider than a tile: ``band``
    of one expert's X rows at a time, merged as :func:`fused_expert_tiles` merges the expert
    (its delta's rows ``start:stop``), into buffers reused from band to band."""
    spec = tensor.spec
    experts, rows = spec.shape[0], spec.shape[1]
    workspace: torch.Tensor | None = None
    on_cpu = device.type == "cpu"
    for expert in range(experts):
        lora_a_e, lora_b_e = _expert_factors(delta, adapter, expert, buffers)
        lora_a_e, lora_b_e = lora_a_e.to(device), lora_b_e.to(device)
        factors = prepare_lora_factors(
            lora_a_e, lora_b_e, delta.scale, delta.transposed, compute_dtype
        )
        if workspace is None:  # the product's layout (see lora_delta_rows)
            assert factors.lora_b is not None
            shape = (
                (factors.lora_b.shape[0], band)
                if delta.transposed
                else (band, factors.lora_a.shape[1])
            )
            workspace = torch.empty(shape, dtype=compute_dtype, device=device)
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            count = stop - start
            # In float32 where the format decodes to it exactly (MXFP4): the add below
            # then widens nothing (a float32 add, 0.14 against 0.53 ns a value with a
            # bfloat16 operand, measured on one core).
            values = source.read_subrows(
                tensor.source_key, expert, start, stop, buffers.read, compute_dtype
            )
            values = values.to(device)
            product = workspace[:, :count] if delta.transposed else workspace[:count]
            merged = merged_rows(values.reshape(count, -1), factors, start, product)
            if not on_cpu:
                merged = merged.to(spec.dtype.torch).cpu()
            # The one rounding, as for every other weight (see _ProductRows.tiles).
            out = buffers.output(spec.dtype.torch, tuple(values.shape))
            yield out.view(count, -1).copy_(merged).view(values.shape)


def _expert_factors(
    delta: LoraProduct, adapter: TensorSource, expert: int, buffers: TileBuffers
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's A (r, in) and B (out, r) of a fused-experts LoRA, read without holding
    every expert's: A's rows ``e·r:(e+1)·r``, and B's columns ``e::E`` gathered from
    tile-sized runs of B's rows (see :func:`expert_lora_factors` for the layout). B is
    read once per expert: for gpt-oss-20b, 6 MB of page cache copied, to keep 6 MB per
    thread out of memory."""
    experts = delta.experts
    out_features, columns = adapter.shape(delta.b_key)
    rank = columns // experts
    lora_a = adapter.read_rows(delta.a_key, expert * rank, (expert + 1) * rank)
    lora_b = torch.empty((out_features, rank), dtype=adapter.dtype(delta.b_key).torch)
    run = max(1, buffers.tile_bytes // (columns * lora_b.dtype.itemsize))
    for start in range(0, out_features, run):
        stop = min(out_features, start + run)
        rows = adapter.read_rows(delta.b_key, start, stop, buffers.read)
        lora_b[start:stop].copy_(rows[:, expert::experts])
    return lora_a, lora_b
