"""The stream's NaN/Inf check reads float bits; the oracle is ``torch.isfinite``."""

from __future__ import annotations

import pytest
import torch

from lora_merge.compute.lora import all_finite_bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_is_judged_as_isfinite_judges_it(dtype: torch.dtype) -> None:
    """All 65536 values of the type, one at a time and among finite neighbours."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(patterns).tolist()
    neighbours = torch.linspace(-3, 3, 63).to(dtype)
    for index in range(patterns.numel()):
        tile = torch.cat([neighbours[:31], patterns[index : index + 1], neighbours[31:]])
        assert all_finite_bits(tile) == finite[index], (dtype, index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "special", [float("inf"), float("-inf"), float("nan"), -float("nan"), None]
)
def test_wide_floats_and_the_scratch_buffer(dtype: torch.dtype, special: float | None) -> None:
    """float32/float64 tiles with one special value (or the extremes only), with and
    without a scratch buffer; the scratch is only written, the tile is unchanged."""
    info = torch.finfo(dtype)
    tile = torch.tensor([info.max, -info.max, info.tiny / 2, -0.0, 1.5] * 20, dtype=dtype)
    if special is not None:
        tile[57] = special
    before = tile.clone()
    expected = bool(torch.isfinite(tile).all())
    assert all_finite_bits(tile) == expected
    assert all_finite_bits(tile, torch.empty(tile.numel() * 8, dtype=torch.uint8)) == expected
    assert torch.equal(tile.view(torch.uint8), before.view(torch.uint8))
