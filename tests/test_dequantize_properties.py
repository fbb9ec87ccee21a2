"""Property tests for the pure pieces of quantized-base support, with bitsandbytes as the oracle.

- Dequantizing any block-aligned run of a quantized tensor, with the pure-torch path,
  gives the bits bitsandbytes gives for the whole (flat) tensor; NF4/FP4 round trips
  land within half a code step of the original.
- The quantized-group parser, fed random quant states and tensor shapes (a checkpoint
  comes from the internet), either accepts a group that then reads back at its logical
  shape, or refuses it with our own error; it never crashes or reads out of bounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from merge_oracle import ulp
from quantized_oracle import assert_bitsandbytes_bits_but_fp4_negative_zeros, float_bits
from safetensors.torch import save_file

from lora_merge.compute.dequantize import (
    FOUR_BIT_BLOCKSIZES,
    DequantizeWorkspace,
    dequantize_4bit,
    dequantize_nested_absmax,
    four_bit_code,
)
from lora_merge.errors import LoraMergeError
from lora_merge.inputs.resolve import resolve_base
from lora_merge.io.dequantizing_reader import DequantizingReader
from lora_merge.io.reader import SafetensorsReader

# One workspace for every example below, as one merge thread keeps one for all its tiles.
SHARED_WORKSPACE = DequantizeWorkspace()


PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.bitsandbytes
@PROPERTY_SETTINGS
@given(
    numel=st.integers(1, 3000),
    blocksize=st.sampled_from(FOUR_BIT_BLOCKSIZES[:4]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_any_block_aligned_run_dequantizes_to_bitsandbytes_bits(
    numel, blocksize, quant_type, double_quant, dtype, seed, data
):
    import bitsandbytes.functional as bnb_functional

    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(
        values, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    whole = bnb_functional.dequantize_4bit(packed, state).reshape(-1)
    absmax = state.absmax.float()
    if double_quant:
        ours = dequantize_nested_absmax(
            state.absmax,
            state.state2.absmax,
            state.state2.code,
            state.state2.blocksize,
            float(state.offset),
        )
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(ours, absmax)
    blocks = -(-numel // blocksize)
    first_block = data.draw(st.integers(0, blocks - 1))
    last_block = data.draw(st.integers(first_block + 1, blocks))
    first, last = first_block * blocksize, min(numel, last_block * blocksize)
    codes = packed.reshape(-1)[first // 2 : (last + 1) // 2]
    run = dequantize_4bit(
        codes, absmax[first_block:last_block], quant_type, blocksize, last - first, dtype
    )
    assert_bitsandbytes_bits_but_fp4_negative_zeros(whole[first:last], run)
    if quant_type == "nf4":
        assert torch.equal(float_bits(run), float_bits(whole[first:last]))
    # Into a reused output and the one workspace every example shares (grown, never
    # cleared): the same bits.
    out = torch.full((last - first,), float("nan"), dtype=dtype)
    dequantize_4bit(
        codes,
        absmax[first_block:last_block],
        quant_type,
        blocksize,
        last - first,
        dtype,
        out=out,
        workspace=SHARED_WORKSPACE,
    )
    assert torch.equal(float_bits(out), float_bits(run))
    # Round trip. bitsandbytes scales each block by its absmax a (the largest |value| in it)
    # and stores the code nearest to value / a, so |code * a - value| <= a * (half the widest
    # gap between codes + 2 float32 unit roundoffs for the division and the comparison). It
    # decodes with the stored scale â: a itself, or a's 8-bit double-quantized approximation,
    # which adds |code| * |â - a| <= |â - a|; then one float32 product and one rounding to dtype.
    code = four_bit_code(quant_type).sort().values
    widest_gap = float((code[1:] - code[:-1]).max())
    blocks_of_values = torch.zeros(blocks * blocksize, dtype=torch.float64)
    blocks_of_values[:numel] = values.double().abs()
    true_absmax = blocks_of_values.view(blocks, blocksize).amax(dim=1)
    stored_absmax = absmax.double()
    per_block = (
        true_absmax * (0.5 * widest_gap + 2 * 2.0**-24) + (stored_absmax - true_absmax).abs()
    )
    bound = per_block.repeat_interleave(blocksize)[:numel]
    bound += 2.0**-24 * whole.double().abs() + 0.5 * ulp(whole, dtype)
    error = (whole.double() - values.double()).abs()
    assert bool((error <= bound).all())


_SHAPES = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=6)
)


@settings(PROPERTY_SETTINGS, max_examples=80)
@given(
    state=st.fixed_dictionaries(
        {},
        optional={
            "quant_type": st.one_of(st.sampled_from(["nf4", "fp4"]), _JSON_VALUES),
            "blocksize": st.one_of(st.sampled_from([32, 64, 128]), _JSON_VALUES),
            "dtype": st.one_of(st.sampled_from(["bfloat16", "float16"]), _JSON_VALUES),
            "shape": st.one_of(st.lists(st.integers(-2, 40), max_size=3), _JSON_VALUES),
            "nested_blocksize": st.one_of(st.just(256), _JSON_VALUES),
            "nested_offset": _JSON_VALUES,
            "nested_dtype": st.one_of(st.just("float32"), _JSON_VALUES),
        },
    ),
    packed_shape=_SHAPES,
    absmax_shape=_SHAPES,
    absmax_uint8=st.booleans(),
    nested=st.booleans(),
    nested_shape=_SHAPES,
    raw_state=st.one_of(st.none(), st.binary(max_size=40)),
    consistent=st.booleans(),
)
def test_quantized_group_parser_accepts_only_groups_it_can_read(
    state, packed_shape, absmax_shape, absmax_uint8, nested, nested_shape, raw_state, consistent
):
    name = "model.layers.0.mlp.up_proj.weight"
    quant_type = state.get("quant_type") if state.get("quant_type") in ("nf4", "fp4") else "nf4"
    if consistent:
        # A group that fits together (what bitsandbytes writes): it must be accepted and read.
        shape = list(packed_shape) or [1]
        blocksize = state.get("blocksize") if state.get("blocksize") in (32, 64, 128) else 64
        numel = 1
        for size in shape:
            numel *= size
        blocks = -(-numel // blocksize)
        state = {
            "quant_type": quant_type,
            "blocksize": blocksize,
            "dtype": "float16",
            "shape": shape,
        }
        if nested:
            state.update(nested_blocksize=256, nested_offset=0.01, nested_dtype="float32")
        packed_shape, absmax_shape, absmax_uint8 = ((numel + 1) // 2, 1), (blocks,), nested
        nested_shape, raw_state = (-(-blocks // 256),), None
    encoded = raw_state if raw_state is not None else json.dumps(state).encode()
    tensors = {
        name: torch.zeros(packed_shape, dtype=torch.uint8),
        f"{name}.absmax": torch.ones(
            absmax_shape, dtype=torch.uint8 if absmax_uint8 else torch.float32
        ),
        f"{name}.quant_map": four_bit_code(quant_type),
        f"{name}.quant_state.bitsandbytes__{quant_type}": torch.frombuffer(
            bytearray(encoded or b" "), dtype=torch.uint8
        ),
    }
    if nested:
        tensors[f"{name}.nested_absmax"] = torch.ones(nested_shape, dtype=torch.float32)
        tensors[f"{name}.nested_quant_map"] = torch.linspace(-1, 1, 256)
    with TemporaryDirectory() as folder:
        save_file(tensors, Path(folder) / "model.safetensors")
        try:
            base = resolve_base(folder)
        except LoraMergeError:
            assert not consistent
            return
        logical = base.tensors[name]
        with DequantizingReader(
            SafetensorsReader(base.entries), base.tensors, "cpu", "torch"
        ) as reader:
            rows = reader.read_rows(name)
        assert tuple(rows.shape) == logical.shape and rows.dtype == logical.dtype.torch


@pytest.mark.bitsandbytes
def test_parser_accepts_a_consistent_group():
    """The property above is not vacuous: a well-formed group (as bitsandbytes makes it) passes."""
    import bitsandbytes.functional as bnb_functional

    values = torch.randn(6, 10).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(values, blocksize=32, quant_type="fp4")
    name = "layer.weight"
    tensors = {name: packed}
    tensors.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    with TemporaryDirectory() as folder:
        save_file(tensors, Path(folder) / "model.safetensors")
        base = resolve_base(folder)
        with DequantizingReader(SafetensorsReader(base.entries), base.tensors) as reader:
            rows = reader.read_rows(name, 1, 4)
    flat = bnb_functional.dequantize_4bit(packed, state).reshape(-1)  # 10-wide rows, 32-blocks
    assert torch.equal(rows.reshape(-1), flat[10:40])
