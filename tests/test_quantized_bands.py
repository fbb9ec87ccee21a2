"""Quantized weights read and written in pieces smaller than a row of blocks or an expert
(issue 21: memory bounded by the tile, not by the weight's width).

gpt-oss-20b's expert is 33 MB of bf16, more than a tile, so the stream reads a band of
an expert's logical rows at a time (``Mxfp4Weight.read_subrows``): a band of the stored
tensor's columns, which may start and end inside a block of 32. The oracle is
transformers' own dequantization (``convert_moe_packed_tensors``) of the whole tensor.

FP8 block-wise re-quantization (``merged_native``) quantizes a wide row of blocks a run
of block columns at a time; the oracle is transformers' ``Fp8Quantize`` of the whole
weight.
"""

from __future__ import annotations

import json

import pytest
import torch
from merge_oracle import read_safetensors_directory
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_native_fp8_mxfp4 import (
    EXPERTS,
    FP8_BLOCK,
    TILED_MAX_MEMORY,
    compressed_tensors_mxfp4,
    fp8_quantizer,
    mxfp4,  # noqa: F401 (the fixture)
    transformers_mxfp4,
)
from test_native_fp8_mxfp4 import (
    test_mxfp4_expert_merge_is_the_float64_merge_of_transformers_dequantization as check_merge,
)
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.compute.fp8 import FP8_QUANTIZE_CHUNK_ELEMENTS, quantize_fp8_blocks
from lora_merge.compute.mxfp4 import MXFP4_BLOCK
from lora_merge.inputs.resolve import resolve_base
from lora_merge.io.dequantizing_reader import DequantizingReader, dequantize_workspace_bound
from lora_merge.io.formats.mxfp4 import MXFP4_QUANTIZE_CHUNK_ELEMENTS, Mxfp4Native
from lora_merge.io.reader import SafetensorsReader
from lora_merge.io.shard_writer import ShardWriter

pytestmark = [
    pytest.mark.filterwarnings("ignore::lora_merge.errors.LoraMergeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.mark.parametrize("band", [1, 5, 21, 32, 40])
def test_mxfp4_expert_bands_are_transformers_dequantization_bit_for_bit(mxfp4, band):  # noqa: F811
    """Every band of every expert, most starting and ending inside a block of 32, is
    transformers' dequantization of those rows (bfloat16; in float32 when the merge asks for
    its compute dtype, those values widened); the reading thread holds no more than its
    format's ``workspace_bound`` for tiles of the band and rows of the expert."""
    base = resolve_base(mxfp4.mxfp4)
    stored = load_file(mxfp4.mxfp4 / "model.safetensors")
    cpu = torch.device("cpu")
    with DequantizingReader(SafetensorsReader(base.entries), base.tensors) as reader:
        for projection in ("gate_up_proj", "down_proj"):
            name = f"{EXPERTS}.{projection}"
            expected = transformers_mxfp4(stored, name)
            experts, rows, columns = expected.shape
            assert band < rows  # smaller than an expert
            buffer = torch.empty(2 * band * columns, dtype=torch.uint8)
            for expert in range(experts):
                for start in range(0, rows, band):
                    stop = min(rows, start + band)
                    got = reader.read_subrows(name, expert, start, stop, buffer)
                    assert got.dtype == expected.dtype
                    assert torch.equal(got, expected[expert, start:stop]), (name, expert, start)
                    # As the merge asks for them: in float32, the bfloat16 values widened.
                    wide = reader.read_subrows(name, expert, start, stop, buffer, torch.float32)
                    assert wide.dtype == torch.float32
                    assert torch.equal(wide, expected[expert, start:stop].float())
            tile_elements = band * columns
            row_elements = rows * columns
            own = base.quantization.format_of[name].workspace_bound(
                tile_elements, cpu, row_elements
            )
            assert own <= dequantize_workspace_bound(tile_elements, cpu, row_elements)
            assert 0 < reader.workspace_nbytes() <= own, name


def test_mxfp4_merge_in_bands_is_the_float64_merge_of_transformers_dequantization(
    mxfp4,  # noqa: F811
    tmp_path,
):
    """A tile budget smaller than an expert (4 KB: bands of 5 of its 64 or 96 rows) merges
    to the float64 merge of transformers' dequantization, as whole experts do."""
    out = tmp_path / "banded"
    options = MergeOptions(
        base=mxfp4.mxfp4,
        adapter=mxfp4.adapter,
        out=out,
        max_memory=TILED_MAX_MEMORY,
        quiet=True,
    )
    merge(options)
    check_merge(type(mxfp4)(mxfp4.base, mxfp4.mxfp4, mxfp4.adapter, out))


def test_mxfp4_experts_no_lora_touches_are_converted_in_bands_bit_for_bit(
    mxfp4,  # noqa: F811
    tmp_path,
):
    """Experts the adapter leaves alone are dequantized to bf16 a band at a time (4 KB
    tiles): transformers' dequantization, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(mxfp4.base, dtype=torch.bfloat16)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    merge(
        MergeOptions(
            base=mxfp4.mxfp4,
            adapter=tmp_path / "adapter",
            out=out,
            max_memory=TILED_MAX_MEMORY,
            quiet=True,
        )
    )
    merged = read_safetensors_directory(out)
    stored = load_file(mxfp4.mxfp4 / "model.safetensors")
    for projection in ("gate_up_proj", "down_proj"):
        name = f"{EXPERTS}.{projection}"
        assert torch.equal(merged[name], transformers_mxfp4(stored, name)), name


@pytest.mark.parametrize("rows", [FP8_BLOCK[0], 2 * FP8_BLOCK[0]])
def test_fp8_block_quantization_in_runs_of_block_columns_is_transformers_bit_for_bit(rows):
    """A weight wide enough that a row of blocks is quantized in several runs of block
    columns (the last one shorter): transformers' ``Fp8Quantize`` of the whole weight."""
    # (transformers quantizes only whole blocks; partial ones are checked elsewhere.)
    columns = 2 * FP8_QUANTIZE_CHUNK_ELEMENTS // FP8_BLOCK[0] + 3 * FP8_BLOCK[1]
    assert columns * FP8_BLOCK[0] > FP8_QUANTIZE_CHUNK_ELEMENTS  # several runs
    generator = torch.Generator().manual_seed(21)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(torch.bfloat16)
    weight[0, : FP8_BLOCK[1]] = 0  # an all-zero block: scale 1
    quantizer, _ = fp8_quantizer(FP8_BLOCK)
    expected = quantizer.convert({"w.weight": weight})
    codes, inv_scales = quantize_fp8_blocks(weight, FP8_BLOCK)
    assert torch.equal(codes.view(torch.uint8), expected["w.weight"].view(torch.uint8))
    assert torch.equal(inv_scales, expected["w.weight_scale_inv"])


def test_fp8_fused_experts_merged_native_in_bands_is_transformers_quantizer(
    mxfp4,  # noqa: F811 (its bf16 gpt-oss base and fused-experts adapter)
    tmp_path,
):
    """Fused FP8 experts (transformers' ``FP8Experts``: ``X.gate_up_proj`` and
    ``X.gate_up_proj_scale_inv`` with the experts first) wider than a tile come to
    ``merged_native`` a band of one expert's rows at a time (4 KB tiles: bands of 5 of
    64 or 96 rows, cutting rows of 32x32 blocks): each expert's codes and scales are
    transformers' ``Fp8Quantize`` of the merged_16bit experts, bit for bit."""
    quantizer, quantization_config = fp8_quantizer(FP8_BLOCK)
    tensors = {}
    for name, tensor in load_file(mxfp4.base / "model.safetensors").items():
        quantized = name.endswith("_proj.weight") or name.endswith(("gate_up_proj", "down_proj"))
        tensors.update(quantizer.convert({name: tensor}) if quantized else {name: tensor})
    assert tensors[f"{EXPERTS}.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert tensors[f"{EXPERTS}.gate_up_proj_scale_inv"].dim() == 3  # (experts, rows, cols)
    base = tmp_path / "fp8"
    base.mkdir()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mxfp4.base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**config, "quantization_config": quantization_config})
    )
    outputs = {}
    for method in ("merged_16bit", "merged_native"):
        outputs[method] = tmp_path / method
        options = MergeOptions(
            base=base,
            adapter=mxfp4.adapter,
            out=outputs[method],
            save_method=method,
            max_memory=TILED_MAX_MEMORY,
            quiet=True,
        )
        merge(options)
    merged = read_safetensors_directory(outputs["merged_16bit"])
    native = read_safetensors_directory(outputs["merged_native"])
    for projection in ("gate_up_proj", "down_proj"):
        name = f"{EXPERTS}.{projection}"
        assert merged[name].shape[1] * merged[name].shape[2] * 8 > 4096  # banded
        expected = quantizer.convert({name: merged[name]})
        assert torch.equal(native[name].view(torch.uint8), expected[name].view(torch.uint8))
        assert torch.equal(native[f"{name}_scale_inv"], expected[f"{name}_scale_inv"])


@pytest.mark.parametrize("band", [5, 32, 45, 96])
def test_mxfp4_requantized_a_band_at_a_time_is_compressed_tensors_quantizer(tmp_path, band):
    """``merged_native``'s MXFP4 writer fed bands of an expert's logical rows (cutting its
    groups of 32, or whole experts), with stored rows so many (2100) that a group row is
    quantized in several runs of stored rows: each expert's codes and exponents are
    compressed-tensors' quantizer of the whole expert, bit for bit."""
    experts, columns, rows = 2, 96, 2100
    assert MXFP4_BLOCK * rows > MXFP4_QUANTIZE_CHUNK_ELEMENTS  # several runs a group row
    generator = torch.Generator().manual_seed(211)
    merged = (torch.randn(experts, columns, rows, generator=generator) * 0.05).to(torch.bfloat16)
    merged[0, :32, :7] = 0  # all-zero groups: exponent of scale 1
    target = Mxfp4Native((experts, columns, rows), torch.bfloat16, "x_blocks", "x_scales")
    path = tmp_path / "model.safetensors"
    tiles = [merged[e, s : s + band] for e in range(experts) for s in range(0, columns, band)]
    if band == 96:  # whole experts in one tile
        tiles = [merged]
    written = []
    with ShardWriter(path, target.stored_specs("x")) as writer:
        target.write(iter(tiles), "x", writer, written.append)
    assert sum(written) == sum(spec.nbytes for spec in target.stored_specs("x"))
    stored = load_file(path)
    for expert in range(experts):
        expected = compressed_tensors_mxfp4(merged[expert].t().contiguous())
        assert torch.equal(stored["x_blocks"][expert].flatten(1), expected["weight_packed"])
        assert torch.equal(stored["x_scales"][expert], expected["weight_scale"])
