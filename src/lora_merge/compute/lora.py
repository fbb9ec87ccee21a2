"""LoRA merge formulas. Tensors in, tensors out; no I/O, no globals.

PEFT (``peft/tuners/lora/layer.py``) merges a Linear layer as
``W += transpose(B @ A, fan_in_fan_out) * scaling``. With the adapter in float32
(PEFT's default ``autocast_adapter_dtype=True``) the in-place add into a 16-bit
weight runs in float32 and rounds once, so computing
``W.float() + scale * (B.float() @ A.float())`` and rounding once reproduces it
bit for bit. For Embedding layers PEFT casts the delta to the weight's dtype
before adding (two roundings); we round once, which is never further from the
exact sum.

For 32-bit outputs we compute in float64: float32 arithmetic would round the
product and the sum at float32 precision, i.e. at the output's own precision,
so the result could be off by more than half a unit in the last place.
"""

from __future__ import annotations

import torch


def compute_dtype_for(output_dtype: torch.dtype) -> torch.dtype:
    """The dtype the merge is computed in before the one final rounding.

    At least twice the output's significand bits, so that the final rounding to
    ``output_dtype`` is what decides the result: float32 for 16-bit outputs
    (8 or 11 bits -> 24), float64 for 32- and 64-bit outputs.
    """
    if output_dtype in (torch.float16, torch.bfloat16) or output_dtype.itemsize < 2:
        return torch.float32
    return torch.float64


def lora_delta_rows(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    transposed: bool,
    start: int,
    stop: int,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``start:stop`` of the stored-layout delta ``scale * B @ A`` (or its transpose).

    Args:
        lora_a: A, shape (r, in).
        lora_b: B, shape (out, r).
        scale: alpha / r or alpha / sqrt(r).
        transposed: the weight is stored as (in, out) (Conv1D, embeddings), so the
            delta is ``(B @ A).T`` and its rows are columns of ``B @ A``.
        start / stop: row range of the stored weight.
        compute_dtype: float32 or float64.

    Returns:
        A new tensor of ``compute_dtype`` with ``stop - start`` rows. The product
        is taken as PEFT takes it (``B @ A``, then ``* scale``) so that the
        float32 result is the same number.
    """
    if transposed:
        product = torch.matmul(lora_b.to(compute_dtype), lora_a[:, start:stop].to(compute_dtype)).T
    else:
        product = torch.matmul(lora_b[start:stop].to(compute_dtype), lora_a.to(compute_dtype))
    return product.mul_(scale)


def add_and_round(
    base_rows: torch.Tensor, delta_rows: torch.Tensor, output_dtype: torch.dtype
) -> torch.Tensor:
    """``base + delta`` in ``delta``'s dtype, then one rounding to ``output_dtype``.

    ``delta_rows`` is consumed (used as the accumulator).
    """
    return delta_rows.add_(base_rows.to(delta_rows.dtype)).to(output_dtype)


def merge_lora_rows(
    base_rows: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    transposed: bool,
    start: int,
    stop: int,
    output_dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``start:stop`` of ``W + scale * B @ A``, rounded once to ``output_dtype``.

    Args:
        base_rows: rows ``start:stop`` of the stored weight W.
        lora_a / lora_b / scale / transposed: as in :func:`lora_delta_rows`.
        start / stop: the row range ``base_rows`` covers.
        output_dtype: dtype of the result.
    """
    compute_dtype = compute_dtype_for(output_dtype)
    delta = lora_delta_rows(lora_a, lora_b, scale, transposed, start, stop, compute_dtype)
    return add_and_round(base_rows, delta, output_dtype)


def merge_lora_bias(
    base_bias: torch.Tensor, lora_bias: torch.Tensor, scale: float, output_dtype: torch.dtype
) -> torch.Tensor:
    """``bias + scale * lora_B.bias``, rounded once (PEFT ``lora_bias=True``)."""
    compute_dtype = compute_dtype_for(output_dtype)
    delta = lora_bias.to(compute_dtype).mul(scale)
    return add_and_round(base_bias, delta, output_dtype)
