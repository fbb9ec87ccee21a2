"""The merge's one-pass NaN/Inf proof (``rounds_to_finite``) and the exact check behind it.

The merge decides "every rounded value is finite" from a sum of squares taken
before the rounding. The oracle is the rounding itself: torch's conversion to the
output dtype, and the overflow thresholds written out as bit patterns (not derived
from ``torch.finfo`` as the code derives them). The proof may say "not proven"
(False) for finite values, never "finite" for values that are not; where it does
not prove, the executor's exact check on the rounded values decides, which the
merge-level tests below exercise on both sides of bfloat16's threshold.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from handmade_checkpoints import write_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_merge.compute.lora import rounds_to_finite

EXIT_NONFINITE = 7


def float32_from_bits(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


# The smallest magnitude that rounds to infinity: the midpoint above each dtype's
# largest finite value (a tie rounds to the even neighbour, infinity).
OVERFLOW_AT = {
    torch.bfloat16: float32_from_bits(0x7F7F8000),
    torch.float16: 65520.0,
    torch.float32: 2.0**128 - 2.0**103,
}
COMPUTE_DTYPE = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.float32: torch.float64,
}


def interesting_values(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Ordinary weights, values at and around the overflow threshold, and non-finite ones."""
    threshold = OVERFLOW_AT[dtype]
    near = st.sampled_from([0.5, 0.999, 0.9999999, 1.0, 1.0000001, 1.5]).map(
        lambda factor: factor * threshold
    )
    return st.one_of(
        st.floats(-4.0, 4.0, allow_nan=False),
        near,
        near.map(lambda value: -value),
        st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0]),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_proven_finite_only_when_every_rounded_value_is(dtype: torch.dtype, data) -> None:
    compute = COMPUTE_DTYPE[dtype]
    values = data.draw(st.lists(interesting_values(dtype), min_size=1, max_size=40))
    tensor = torch.tensor(values, dtype=compute)
    if rounds_to_finite(tensor, dtype):
        assert bool(torch.isfinite(tensor.to(dtype)).all())
        assert all(abs(value) < OVERFLOW_AT[dtype] for value in tensor.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_ordinary_weights_are_proven_finite(dtype: torch.dtype) -> None:
    """The merge's fast path: a tile of ordinary weights needs no second pass."""
    generator = torch.Generator().manual_seed(0)
    tile = torch.randn(64, 2048, generator=generator, dtype=COMPUTE_DTYPE[dtype])
    assert rounds_to_finite(tile, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_one_value_at_the_threshold_is_not_proven(dtype: torch.dtype) -> None:
    tile = torch.zeros(64, 2048, dtype=COMPUTE_DTYPE[dtype])
    tile[17, 5] = -OVERFLOW_AT[dtype]
    assert not bool(torch.isfinite(tile.to(dtype)).all())
    assert not rounds_to_finite(tile, dtype)


def test_not_proven_outside_what_the_bound_covers() -> None:
    """A strided tile, a 16-bit tile (nothing left to round) and an fp8 output say "not proven"."""
    tile = torch.ones(8, 8)
    assert not rounds_to_finite(tile.T[:, :4], torch.bfloat16)
    assert not rounds_to_finite(tile.to(torch.bfloat16), torch.bfloat16)
    assert not rounds_to_finite(tile, torch.float8_e4m3fn)


def merge_one_bf16_value(
    tmp_path: Path, base_value: float, delta: float
) -> subprocess.CompletedProcess[str]:
    """Merge W = base_value (bfloat16, 8x8) with a rank-1 delta of ``delta`` everywhere."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    weight = torch.full((8, 8), base_value, dtype=torch.bfloat16)
    save_file({"model.layers.0.self_attn.q_proj.weight": weight}, base / "model.safetensors")
    lora = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full((8, 1), delta),
    }
    write_adapter(adapter, lora, r=1, lora_alpha=1)
    return run_cli(base, adapter, tmp_path / "merged", "-q")


def test_sum_overflowing_bf16_is_refused(tmp_path: Path) -> None:
    """3.3895e38 (bfloat16's largest) + 2e36 lies past the threshold: Inf, refused."""
    largest = float32_from_bits(0x7F7F0000)
    result = merge_one_bf16_value(tmp_path, largest, 2e36)
    assert result.returncode == EXIT_NONFINITE, result.stderr
    assert "overflows torch.bfloat16" in result.stderr


def test_sum_at_bf16s_largest_value_is_written(tmp_path: Path) -> None:
    """Just below the threshold the bound proves nothing (the squares overflow float32),
    the exact check passes and the merge writes bfloat16's largest value, as rounding
    the float32 sum gives."""
    largest = float32_from_bits(0x7F7F0000)
    delta = float32_from_bits(0x7F7F7FFF) - largest  # the sum: just below the midpoint
    result = merge_one_bf16_value(tmp_path, largest, delta)
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    weight = merged["model.layers.0.self_attn.q_proj.weight"]
    expected = (torch.tensor(largest) + torch.tensor(delta)).to(torch.bfloat16)
    assert torch.isfinite(expected) and torch.equal(
        weight, torch.full((8, 8), expected.item(), dtype=torch.bfloat16)
    )
