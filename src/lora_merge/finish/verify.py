"""``--verify``: reopen the written shards and check them against the plan and the inputs.

Runs on the staging folder, before the rename, so a failed check means OUT never
appears. It reads OUT with the safetensors library itself (not our reader or
writer), so it is an independent look at what was written:

- every planned tensor is present exactly once, with the planned dtype and shape;
- tensors copied from BASE are byte-identical to BASE (sha256 of both byte ranges);
- for every merged tensor, a sample of rows equals a float64 recomputation
  ``W + scale * B @ A`` rounded once to the output dtype, to within one unit in
  the last place plus the rounding error of the merge's own float32 arithmetic
  (a standard bound, ``(r + 2) * u * (|W| + |scale| * |B| @ |A|)``, with ``u``
  half the compute dtype's epsilon). The bound matters where W and the delta
  nearly cancel: there the float32 sum can be many output ulps from the exact one.
  For DoRA with one output feature per row (Linear, convolutions) the sampled
  rows are recomputed as ``m / ||V|| * V``; DoRA whose norm spans columns
  (embeddings, Conv1D) is checked for presence, dtype and shape only, since
  recomputing one row needs the whole tensor.
- a weight an AdaLoRA, IA3, LoHa, LoKr, OFT or VeRA module changes: its sampled rows
  recomputed in float64 by the type's own formula (:mod:`lora_merge.plan.tuners`),
  within one unit in the last place plus ``n * u`` times the row's sums of
  absolute terms (:func:`~lora_merge.plan.tuners.rows.tuner_sum_terms`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from lora_merge.compute.lora import compute_dtype_for
from lora_merge.errors import VerificationError
from lora_merge.io.hashing import sha256_of
from lora_merge.io.reader import TensorSource
from lora_merge.io.safetensors_format import TensorEntry
from lora_merge.plan.kinds.dora import norm_per_column, read_magnitude
from lora_merge.plan.kinds.experts import expert_lora_factors
from lora_merge.plan.kinds.factors import read_lora_factors
from lora_merge.plan.model import LoraProduct, PlannedTensor, TunerUpdate
from lora_merge.plan.tuners.rows import tuner_compute_dtype, tuner_row_merger, tuner_sum_terms

SAMPLED_ROWS = 4


def verify_output(
    folder: Path,
    shards: Sequence[tuple[str, Sequence[PlannedTensor]]],
    base_entries: dict[str, TensorEntry],
    adapter: TensorSource,
    base: TensorSource | None = None,
) -> int:
    """Check the shards in ``folder``; return the number of tensors checked.

    ``base`` reads the rows of weights the base stores quantized (dequantized,
    see :class:`~lora_merge.io.dequantizing_reader.DequantizingReader`); stored
    tensors are read from the files with the safetensors library.

    Raises:
        VerificationError: the first disagreement found, naming the tensor.
    """
    checked = 0
    for file_name, tensors in shards:
        path = folder / file_name
        data_offsets = _data_offsets(path)
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            planned = {t.spec.name for t in tensors}
            if keys != planned:
                extra, missing = sorted(keys - planned), sorted(planned - keys)
                raise VerificationError(
                    f"{file_name} holds {extra[:3]} not planned and lacks {missing[:3]}"
                )
            for tensor in tensors:
                _check_tensor(handle, path, data_offsets, tensor, base_entries, adapter, base)
                checked += 1
    return checked


def _check_tensor(
    handle,
    path: Path,
    data_offsets: dict[str, int],
    tensor: PlannedTensor,
    base_entries: dict[str, TensorEntry],
    adapter: TensorSource,
    base: TensorSource | None,
) -> None:
    name, spec = tensor.spec.name, tensor.spec
    written = handle.get_slice(name)
    planned_dtype = spec.dtype.name
    if tuple(written.get_shape()) != spec.shape or planned_dtype != written.get_dtype():
        raise VerificationError(
            f"{name} in {path.name} is {written.get_dtype()} {tuple(written.get_shape())}, "
            f"planned {spec.dtype} {spec.shape}"
        )
    if tensor.is_byte_copy:
        source = base_entries[tensor.source_key]
        written_digest = sha256_of(path, data_offsets[name], spec.nbytes)
        if sha256_of(source.path, source.start, source.nbytes) != written_digest:
            raise VerificationError(f"{name} in {path.name} differs from BASE's bytes")
        return
    # (A re-quantized weight holds 4-bit codes: its values are checked by loading OUT, in the tests.)
    if (
        isinstance(tensor.delta, LoraProduct)
        and spec.shape
        and tensor.requantize is None
        and tensor.token_rows is None  # replaced rows are not W + scale * B @ A
        and not norm_per_column(tensor.delta)
    ):
        _check_sampled_rows(handle, name, tensor, tensor.delta, base_entries, adapter, base)
    elif isinstance(tensor.delta, TunerUpdate) and len(spec.shape) >= 2 and not tensor.requantize:
        _check_tuner_rows(handle, name, tensor, tensor.delta, base_entries, adapter, base)


def _check_tuner_rows(
    handle,
    name: str,
    tensor: PlannedTensor,
    delta: TunerUpdate,
    base_entries: dict[str, TensorEntry],
    adapter: TensorSource,
    base: TensorSource | None,
) -> None:
    spec = tensor.spec
    picks = sorted(
        {0, spec.shape[0] - 1}
        | set(torch.randint(0, spec.shape[0], (SAMPLED_ROWS,), generator=_generator(name)).tolist())
    )
    cpu = torch.device("cpu")
    exact_rows = tuner_row_merger(delta, adapter, spec.shape, torch.float64, cpu)
    absolute_rows = tuner_row_merger(delta, adapter, spec.shape, torch.float64, cpu, absolute=True)
    unit_roundoff = torch.finfo(tuner_compute_dtype(delta, spec.dtype.torch)).eps / 2
    terms = tuner_sum_terms(delta, adapter)
    base_rows = _source_rows(tensor, picks, base_entries, adapter, base)
    written = handle.get_slice(name)
    for row in picks:
        base_row = base_rows[row].double().reshape(1, -1)
        exact = exact_rows(base_row, row)[0]
        arithmetic_error = terms * unit_roundoff * absolute_rows(base_row.abs(), row)[0]
        expected = exact.to(spec.dtype.torch)
        actual = written[row : row + 1][0].reshape(-1)
        spacing = _ulp(torch.maximum(actual.abs(), expected.abs())) + arithmetic_error
        if not bool(((actual.double() - expected.double()).abs() <= spacing).all()):
            raise VerificationError(
                f"row {row} of {name} differs from a float64 recomputation of its "
                f"{delta.tuner} update by more than one unit in the last place plus the "
                "rounding bound"
            )


def _check_sampled_rows(
    handle,
    name: str,
    tensor: PlannedTensor,
    delta: LoraProduct,
    base_entries: dict[str, TensorEntry],
    adapter: TensorSource,
    base: TensorSource | None,
) -> None:
    rows = tensor.spec.shape[0]
    picks = sorted(
        {0, rows - 1, *torch.randint(0, rows, (SAMPLED_ROWS,), generator=_generator(name)).tolist()}
    )
    # The factors as the stream reads them: 2-D, a convolution's rows flat, one
    # expert's slices of A and B for one expert's weight.
    factor_a, factor_b = read_lora_factors(delta, adapter)
    lora_a = factor_a.double()
    # A whole delta (a combination kept at full rank) is B @ A with B the identity.
    lora_b = (
        torch.eye(lora_a.shape[0], dtype=torch.float64) if factor_b is None else factor_b.double()
    )
    rank = 0 if factor_b is None else lora_a.shape[0]  # a whole delta: no product is rounded
    dora_magnitude = None
    if delta.magnitude_key is not None:
        dora_magnitude = read_magnitude(delta, adapter).double()
    written = handle.get_slice(name)
    unit_roundoff = torch.finfo(compute_dtype_for(tensor.spec.dtype.torch)).eps / 2
    base_rows = _source_rows(tensor, picks, base_entries, adapter, base)
    for row in picks:
        base_row = base_rows[row].double().reshape(-1)
        if delta.experts > 1 and delta.expert is None:  # a fused (E, X, Y) weight: row = expert
            lora_a_e, lora_b_e = expert_lora_factors(lora_a, lora_b, row, delta.experts)
            product, magnitude = lora_b_e @ lora_a_e, lora_b_e.abs() @ lora_a_e.abs()
            if delta.transposed:
                product, magnitude = product.T, magnitude.T
            product, magnitude = product.reshape(-1), magnitude.reshape(-1)
        elif delta.transposed:
            product, magnitude = lora_b @ lora_a[:, row], lora_b.abs() @ lora_a[:, row].abs()
        else:
            product, magnitude = lora_b[row] @ lora_a, lora_b[row].abs() @ lora_a.abs()
        exact = base_row + delta.scale * product
        actual = written[row : row + 1][0].reshape(-1)
        arithmetic_error = (
            (rank + 2) * unit_roundoff * (base_row.abs() + abs(delta.scale) * magnitude)
        )
        if dora_magnitude is not None:
            factor = float(dora_magnitude[row] / exact.norm())
            exact = factor * exact
            # The norm's own float32 error (a sum of len(row) squares), then the scaling.
            arithmetic_error = abs(factor) * arithmetic_error + (
                (exact.numel() + 4) * unit_roundoff * exact.abs()
            )
        expected = exact.to(tensor.spec.dtype.torch)
        # One ulp of the larger of the two: they may sit on either side of a power of two.
        spacing = _ulp(torch.maximum(actual.abs(), expected.abs())) + arithmetic_error
        if not bool(((actual.double() - expected.double()).abs() <= spacing).all()):
            raise VerificationError(
                f"row {row} of {name} differs from a float64 recomputation of W + scale * B @ A "
                "by more than one unit in the last place plus the float32 rounding bound"
            )


def _source_rows(
    tensor: PlannedTensor,
    picks: list[int],
    base_entries: dict[str, TensorEntry],
    adapter: TensorSource,
    base: TensorSource | None,
) -> dict[int, torch.Tensor]:
    """The sampled rows of the tensor's starting values, reading its file once."""
    if tensor.source == "adapter":
        return {row: adapter.read_rows(tensor.source_key, row, row + 1)[0] for row in picks}
    if tensor.dequantized or tensor.as_trained is not None:  # the reader transforms it
        if base is None:
            raise ValueError(f"{tensor.spec.name} is stored quantized: pass the base reader")
        return {row: base.read_rows(tensor.source_key, row, row + 1)[0].cpu() for row in picks}
    entry = base_entries[tensor.source_key]
    with safe_open(entry.path, framework="pt") as handle:
        stored = handle.get_slice(tensor.source_key)
        return {row: stored[row : row + 1][0] for row in picks}


def _ulp(values: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype of ``values`` at each value (in float64)."""
    info = torch.finfo(values.dtype)
    magnitude = values.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def _data_offsets(path: Path) -> dict[str, int]:
    """Absolute start of each tensor's bytes, from the file's own header (read once per shard)."""
    with open(path, "rb") as raw:
        (length,) = struct.unpack("<Q", raw.read(8))
        header = json.loads(raw.read(length))
    header.pop("__metadata__", None)
    return {name: 8 + length + info["data_offsets"][0] for name, info in header.items()}


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
