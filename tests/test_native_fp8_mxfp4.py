"""FP8 block-wise, FP8 per-channel and MXFP4 bases: dequantized exactly, merged, written back.

The checkpoints are made at test time by the real writers where they run on a CPU
(transformers' fine-grained FP8 quantizer; compressed-tensors' compressors) and otherwise
in the exact layout of a released checkpoint (gpt-oss' MXFP4 experts, DeepSeek-V3's partial
FP8 edge blocks; see native_formats.py). The oracles are the real libraries' decoders
(transformers' ``Fp8Dequantize`` and ``convert_moe_packed_tensors``, compressed-tensors'
decompressors), each checked against a float64 decoding of the format's definition, a
float64 merge, and PEFT running the adapter on the model transformers loads from the
quantized checkpoint (on a CPU it dequantizes on load).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStrategy,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from merge_oracle import (
    FLOAT32_UNIT_ROUNDOFF,
    FLOAT64_UNIT_ROUNDOFF,
    expected_misroundings,
    misrounding_limit,
    read_adapter,
    read_safetensors_directory,
    resolve_lora_factors,
    ulp,
)
from native_formats import (
    decode_fp8_float64,
    decode_mxfp4_float64,
    dequantize_fp8_blocks_float64,
    fp8_quantizer,
    gpt_oss_mxfp4_tensors,
    quantize_fp8_blocks_float64,
    save_fp8_copy,
    save_quantized_model,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_checkpoints import prompt_logits, save_random_bf16_llama, save_random_lora_adapter
from transformers import AutoModelForCausalLM, GptOssConfig
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lora_merge import MergeOptions, merge
from lora_merge.api import preview_merge
from lora_merge.compute import fp8 as compute_fp8
from lora_merge.compute.mxfp4 import quantize_mxfp4
from lora_merge.errors import InvalidInputError
from lora_merge.inputs.resolve import resolve_base
from lora_merge.io.dequantizing_reader import DequantizingReader, dequantize_workspace_bound
from lora_merge.io.formats import fp8_block
from lora_merge.io.reader import SafetensorsReader
from lora_merge.stream.executor import CPU_TILE_WORKSPACE_BYTES

pytestmark = [
    # The adapter names the 16-bit base it was made on; merging it into the quantized ones is
    # the point.
    pytest.mark.filterwarnings("ignore::lora_merge.errors.LoraMergeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

EXIT_INVALID_INPUT = 4
# Small enough that every weight is merged in many row tiles, most of them starting in the
# middle of a block of scales.
TILED_MAX_MEMORY = "4KB"
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP8_BLOCK = (32, 32)


@dataclass
class Fp8Checkpoints:
    """The FP8 inputs, built once: the bf16 base, its FP8 copy, the adapter, the merge."""

    base: Path
    fp8: Path
    adapter: Path
    merged: Path


def transformers_dequantized(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 checkpoint as the model sees it: FP8 weights through
    transformers' ``Fp8Dequantize`` to bf16, the scales left out, the rest as stored."""
    dequantized = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scales = stored[f"{name}_scale_inv"]
            tensor = Fp8Dequantize(None)._dequantize_one(tensor, scales, torch.bfloat16)
        dequantized[name] = tensor
    return dequantized


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Fp8Checkpoints:
    root = tmp_path_factory.mktemp("fp8")
    # Every linear side a multiple of 32 (transformers' quantizer leaves others unquantized).
    base = save_random_bf16_llama(root / "base", intermediate_size=96, seed=21)
    fp8 = save_fp8_copy(base, root / "fp8", FP8_BLOCK)
    adapter = save_random_lora_adapter(base, root / "adapter", LINEAR_MODULES, seed=22)
    merged = root / "merged"
    merge(
        MergeOptions(base=fp8, adapter=adapter, out=merged, max_memory=TILED_MAX_MEMORY, quiet=True)
    )
    return Fp8Checkpoints(base, fp8, adapter, merged)


def read_all_rows(folder: Path, name: str, step: int) -> torch.Tensor:
    """A logical tensor of a base read ``step`` rows at a time, as the stream reads it."""
    base = resolve_base(folder)
    rows = base.tensors[name].shape[0]
    with DequantizingReader(SafetensorsReader(base.entries), base.tensors) as reader:
        return torch.cat(
            [reader.read_rows(name, a, min(rows, a + step)).clone() for a in range(0, rows, step)]
        )


def test_transformers_fp8_dequantization_is_the_format_decoded_in_float64(fp8):
    """The oracle's own check: transformers' ``Fp8Dequantize`` is ``q * s`` (exact in
    float64) rounded to float32, then to bf16."""
    stored = load_file(fp8.fp8 / "model.safetensors")
    names = [n for n in stored if n.endswith("_proj.weight")]
    assert len(names) == len(LINEAR_MODULES)
    for name in names:
        codes, scales = stored[name], stored[f"{name}_scale_inv"]
        assert codes.dtype == torch.float8_e4m3fn
        reference = Fp8Dequantize(None)._dequantize_one(codes, scales, torch.bfloat16)
        exact = dequantize_fp8_blocks_float64(codes, scales, FP8_BLOCK)
        assert torch.equal(reference, exact.float().to(torch.bfloat16)), name


@pytest.mark.parametrize("step", [1, 5, 32, 1000])
def test_fp8_block_rows_are_transformers_dequantization_bit_for_bit(fp8, step):
    stored = load_file(fp8.fp8 / "model.safetensors")
    for name in (n for n in stored if n.endswith("_proj.weight")):
        expected = Fp8Dequantize(None)._dequantize_one(
            stored[name], stored[f"{name}_scale_inv"], torch.bfloat16
        )
        assert torch.equal(read_all_rows(fp8.fp8, name, step), expected), name


@pytest.mark.parametrize("chunk", [1, 100, 2000])
def test_fp8_rows_decoded_a_chunk_at_a_time_are_transformers_dequantization(
    fp8, tmp_path, monkeypatch, chunk
):
    """On the CPU a read of an FP8 matrix reads and decodes its rows a run of
    ``FP8_READ_ELEMENTS`` codes at a time, whatever the rows asked for (the stream reads FP8
    matrices in its I/O tiles), each run a chunk of ``FP8_CHUNK_ELEMENTS`` at a time. Runs
    and chunks of one row, of a row or two ending inside a block of 32, of many rows across
    blocks: each read of a whole matrix, and a merge, gives transformers' values."""
    monkeypatch.setattr(fp8_block, "FP8_READ_ELEMENTS", chunk)
    monkeypatch.setattr(compute_fp8, "FP8_CHUNK_ELEMENTS", max(1, chunk // 3))
    stored = load_file(fp8.fp8 / "model.safetensors")
    names = [n for n in stored if n.endswith("_proj.weight")]
    dequantized = transformers_dequantized(stored)
    for name in names:
        rows = stored[name].shape[0]
        assert torch.equal(read_all_rows(fp8.fp8, name, rows), dequantized[name]), name
    if chunk == 100:  # one merge: the stream's I/O-sized reads of chunked matrices
        merged = tmp_path / "merged"
        merge(MergeOptions(base=fp8.fp8, adapter=fp8.adapter, out=merged, quiet=True))
        result = read_safetensors_directory(merged)
        assert_merged_within_half_an_ulp(result, dequantized, fp8.adapter, torch.bfloat16)


@pytest.mark.parametrize("codes_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_partial_edge_blocks_take_their_blocks_scale(tmp_path, codes_dtype):
    """DeepSeek-V3's ``kv_a_proj_with_mqa`` (576 x 7168 in blocks of 128: scales (5, 56)) in
    miniature, and an experts-first tensor: rows and columns end inside a block."""
    generator = torch.Generator().manual_seed(23)
    matrix = torch.randn(72, 80, generator=generator) * 0.05
    codes, scales = quantize_fp8_blocks_float64(matrix, FP8_BLOCK)
    codes = codes.float().to(codes_dtype)  # e5m2: its own codes of the same values
    experts = (torch.randn(3, 40, 48, generator=generator) * 8).to(codes_dtype)
    expert_scales = torch.rand(3, 2, 2, generator=generator)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(
        {
            "layers.0.self_attn.kv_a_proj_with_mqa.weight": codes,
            "layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": scales,
            "layers.0.mlp.experts.gate_up_proj": experts,
            "layers.0.mlp.experts.gate_up_proj_scale_inv": expert_scales,
        },
        folder / "model.safetensors",
    )
    config = {"dtype": "float32", "quantization_config": fp8_quantizer(FP8_BLOCK)[1]}
    (folder / "config.json").write_text(json.dumps(config))
    name = "layers.0.self_attn.kv_a_proj_with_mqa.weight"
    exact = dequantize_fp8_blocks_float64(codes, scales, FP8_BLOCK).float()
    assert scales.shape == (3, 3)
    for step in (1, 7, 72):
        assert torch.equal(read_all_rows(folder, name, step), exact)
    expected = dequantize_fp8_blocks_float64(experts, expert_scales, FP8_BLOCK).float()
    assert torch.equal(read_all_rows(folder, "layers.0.mlp.experts.gate_up_proj", 2), expected)


def assert_merged_within_half_an_ulp(
    merged: dict[str, torch.Tensor],
    dequantized: dict[str, torch.Tensor],
    adapter: Path,
    dtype: torch.dtype,
) -> None:
    """Every merged element is dequant(W) + scale * B @ A computed in float64, rounded once to
    ``dtype`` (up to the float32 evaluation bound, rare); every other tensor is the base's."""
    config, adapter_tensors = read_adapter(adapter)
    factors = {
        f"{name}.weight": f for name, f in resolve_lora_factors(config, adapter_tensors).items()
    }
    elements = beyond_half = 0
    expected_beyond_half = 0.0
    assert sorted(merged) == sorted(dequantized)
    for name, output in merged.items():
        assert output.dtype == dtype, name
        if name not in factors:
            assert torch.equal(output, dequantized[name].to(dtype)), name
            continue
        lora = factors[name]
        delta, magnitude = lora.delta_and_magnitude()
        weight = dequantized[name].double()
        exact = weight + lora.scale * delta
        bound = (
            (lora.rank + 2)
            * (FLOAT32_UNIT_ROUNDOFF + FLOAT64_UNIT_ROUNDOFF)
            * (weight.abs() + lora.scale * magnitude)
        )
        error = (output.double() - exact).abs()
        half_ulp = 0.5 * ulp(output, dtype)
        assert (error <= half_ulp + bound).all(), name
        elements += error.numel()
        beyond_half += int((error > half_ulp).sum())
        expected_beyond_half += expected_misroundings(bound, 2 * half_ulp)
    assert elements > 0
    assert beyond_half <= misrounding_limit(expected_beyond_half)


def test_fp8_merge_is_the_float64_merge_of_transformers_dequantization(fp8):
    stored = load_file(fp8.fp8 / "model.safetensors")
    dequantized = transformers_dequantized(stored)
    merged = read_safetensors_directory(fp8.merged)
    assert_merged_within_half_an_ulp(merged, dequantized, fp8.adapter, torch.bfloat16)


def test_fp8_merged_model_is_plain_and_matches_peft_on_the_fp8_base(fp8):
    """OUT is a plain bf16 model; its logits equal PEFT's on the model transformers loads from
    the FP8 checkpoint (dequantized on a CPU) to within that model's own noise."""
    config = json.loads((fp8.merged / "config.json").read_text())
    assert "quantization_config" not in config
    assert (
        "dequantized from BASE's fp8 e4m3 (32x32 blocks)" in (fp8.merged / "README.md").read_text()
    )
    merged_logits = prompt_logits(AutoModelForCausalLM.from_pretrained(fp8.merged))
    reference = prompt_logits(
        AutoModelForCausalLM.from_pretrained(fp8.merged, dtype=torch.float64), torch.float64
    )
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(fp8.fp8), fp8.adapter
    ).eval()
    peft_logits = prompt_logits(peft_model)
    with peft_model.disable_adapter():
        without_adapter = prompt_logits(peft_model)
    noise = float((peft_logits.double() - reference).abs().max())
    tolerance = 3 * noise + torch.finfo(torch.bfloat16).eps * float(reference.abs().max())
    assert float((merged_logits - peft_logits).abs().max()) <= tolerance
    assert float((peft_logits - without_adapter).abs().max()) > 5 * tolerance


def _refused(base: Path, adapter: Path, out: Path, **options: object) -> str:
    """Merge, expecting a refusal with exit code 4 and no OUT; return the message."""
    with pytest.raises(InvalidInputError) as refusal:
        merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, **options))
    assert refusal.value.exit_code == EXIT_INVALID_INPUT
    assert "\n" not in str(refusal.value)
    assert not out.exists()
    return str(refusal.value)


def _edited_copy(source: Path, destination: Path, edit) -> Path:
    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    edit(tensors)
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def test_fp8_missing_scale_is_refused_naming_the_tensor(fp8, tmp_path):
    base = _edited_copy(fp8.fp8, tmp_path / "base", lambda t: t.pop(f"{Q_PROJ}_scale_inv"))
    message = _refused(base, fp8.adapter, tmp_path / "out")
    assert repr(Q_PROJ) in message and "scale" in message


def test_fp8_scales_that_do_not_fit_the_block_size_are_refused(fp8, tmp_path):
    def edit(tensors):
        tensors[f"{Q_PROJ}_scale_inv"] = tensors[f"{Q_PROJ}_scale_inv"][:, :1].contiguous()

    message = _refused(_edited_copy(fp8.fp8, tmp_path / "base", edit), fp8.adapter, tmp_path / "o")
    assert f"{Q_PROJ}_scale_inv" in message and "block size" in message


def test_fp8_nan_scales_are_refused_and_nothing_is_written(fp8, tmp_path):
    def edit(tensors):
        tensors[f"{Q_PROJ}_scale_inv"][1, 0] = torch.nan

    message = _refused(_edited_copy(fp8.fp8, tmp_path / "base", edit), fp8.adapter, tmp_path / "o")
    assert f"{Q_PROJ}_scale_inv" in message and "NaN" in message


def test_unknown_quant_method_is_refused_by_name(fp8, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(fp8.fp8, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "quanto-int2"
    (base / "config.json").write_text(json.dumps(config))
    message = _refused(base, fp8.adapter, tmp_path / "out")
    assert "'quanto-int2'" in message and "quant_method" in message


def test_decode_fp8_float64_agrees_with_torch_on_every_code():
    """The float64 decoders' own check: every one of the 256 codes of each FP8 kind."""
    codes = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        ours = decode_fp8_float64(codes.view(dtype))
        theirs = codes.view(dtype).double()
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(0.0), theirs.nan_to_num(0.0))


# --- MXFP4 (gpt-oss) -------------------------------------------------------------------------

EXPERTS = "model.layers.0.mlp.experts"
# openai/gpt-oss-20b's config.json quantization_config.
GPT_OSS_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


@dataclass
class Mxfp4Checkpoints:
    base: Path
    mxfp4: Path
    adapter: Path
    merged: Path


def tiny_gpt_oss_config() -> GptOssConfig:
    # Both expert projections' input sides (hidden 64, intermediate 96) are whole MXFP4 blocks
    # of 32, as gpt-oss-20b's (2880) are; the two have different shapes, so that an expert
    # LoRA's parameter is known by its shape.
    return GptOssConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        layer_types=["full_attention"],
        tie_word_embeddings=False,
    )


def save_mxfp4_copy(base: Path, directory: Path, generator: torch.Generator) -> Path:
    """``base`` with its experts replaced by random MXFP4 experts in gpt-oss' layout."""
    tensors = load_file(base / "model.safetensors")
    for projection in ("gate_up_proj", "down_proj"):
        experts, columns, rows = tensors.pop(f"{EXPERTS}.{projection}").shape  # (E, in, out)
        tensors.update(
            gpt_oss_mxfp4_tensors(f"{EXPERTS}.{projection}", experts, rows, columns, generator)
        )
    return save_quantized_model(base, directory, tensors, GPT_OSS_QUANTIZATION_CONFIG)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Mxfp4Checkpoints:
    root = tmp_path_factory.mktemp("mxfp4")
    torch.manual_seed(24)
    model = AutoModelForCausalLM.from_config(tiny_gpt_oss_config(), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape)
            parameter.copy_((1 + 0.1 * noise if "norm" in name else 0.05 * noise).to(parameter))
    model.save_pretrained(root / "base")
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    mxfp4 = save_mxfp4_copy(root / "base", root / "mxfp4", torch.Generator().manual_seed(25))
    merged = root / "merged"
    merge(MergeOptions(base=mxfp4, adapter=root / "adapter", out=merged, quiet=True))
    return Mxfp4Checkpoints(root / "base", mxfp4, root / "adapter", merged)


def transformers_mxfp4(stored: dict[str, torch.Tensor], name: str, dtype=torch.bfloat16):
    return convert_moe_packed_tensors(
        stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=dtype
    )


def test_transformers_mxfp4_dequantization_is_the_format_decoded_in_float64():
    """The oracle's own check, over every code and every finite exponent (subnormal and
    infinite results included)."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(255, 1).view(255, 1, 16, 16)
    blocks = blocks.transpose(1, 2).reshape(255, 16, 1, 16)  # 255 rows of 16 groups
    scales = torch.arange(255, dtype=torch.uint8).view(255, 1).repeat(1, 16).view(255, 16)
    blocks, scales = blocks.reshape(1, 255, 16, 16), scales.reshape(1, 255, 16)
    exact = decode_mxfp4_float64(blocks, scales).transpose(1, 2)
    for dtype in (torch.bfloat16, torch.float32):
        reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(reference, exact.to(dtype))


def test_mxfp4_rows_are_transformers_dequantization_bit_for_bit(mxfp4, tmp_path):
    stored = load_file(mxfp4.mxfp4 / "model.safetensors")
    for projection in ("gate_up_proj", "down_proj"):
        name = f"{EXPERTS}.{projection}"
        expected = transformers_mxfp4(stored, name)
        assert expected.shape == resolve_base(mxfp4.mxfp4).tensors[name].shape
        for step in (1, 3):
            assert torch.equal(read_all_rows(mxfp4.mxfp4, name, step), expected), name
    # Every exponent (0: subnormal results; 254: infinite ones), in float32.
    blocks = torch.randint(0, 256, (2, 255, 3, 16), dtype=torch.uint8)
    scales = torch.arange(255, dtype=torch.uint8).view(1, 255, 1).repeat(2, 1, 3)
    folder = tmp_path / "extremes"
    folder.mkdir()
    save_file({"e_blocks": blocks, "e_scales": scales}, folder / "model.safetensors")
    config = {"dtype": "float32", "quantization_config": {"quant_method": "mxfp4"}}
    (folder / "config.json").write_text(json.dumps(config))
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(read_all_rows(folder, "e", 1), expected)


def float64_expert_delta(adapter: dict[str, torch.Tensor], module: str, experts: int):
    """PEFT's ``ParamWrapper.get_delta_weight`` restated in float64, transposed as gpt-oss'
    parameters are (``is_transposed``): (E, in, out), and its magnitude."""
    lora_a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    lora_b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])  # (E, r, in)
    b = lora_b.reshape(lora_b.shape[0], -1, experts)  # (out, r, E)
    delta = torch.einsum("ore,eri->eio", b, a)
    return delta, torch.einsum("ore,eri->eio", b.abs(), a.abs()), a.shape[1]


def test_mxfp4_expert_merge_is_the_float64_merge_of_transformers_dequantization(mxfp4):
    stored = load_file(mxfp4.mxfp4 / "model.safetensors")
    merged = read_safetensors_directory(mxfp4.merged)
    adapter = load_file(mxfp4.adapter / "adapter_model.safetensors")
    scale = 8 / 4
    checked = set()
    for module in (EXPERTS, f"{EXPERTS}.base_layer"):
        delta, magnitude, rank = float64_expert_delta(adapter, module, 4)
        for projection in ("gate_up_proj", "down_proj"):
            name = f"{EXPERTS}.{projection}"
            weight = transformers_mxfp4(stored, name).double()
            if weight.shape != delta.shape:
                continue
            exact = weight + scale * delta
            bound = (rank + 2) * (FLOAT32_UNIT_ROUNDOFF + FLOAT64_UNIT_ROUNDOFF)
            bound = bound * (weight.abs() + scale * magnitude)
            output = merged[name]
            assert output.dtype == torch.bfloat16
            error = (output.double() - exact).abs()
            half_ulp = 0.5 * ulp(output, torch.bfloat16)
            assert (error <= half_ulp + bound).all(), name
            beyond = int((error > half_ulp).sum())
            assert beyond <= misrounding_limit(expected_misroundings(bound, 2 * half_ulp))
            checked.add(name)
    assert len(checked) == 2
    for name, tensor in load_file(mxfp4.base / "model.safetensors").items():
        if ("experts" in name and "bias" in name) or "norm" in name or "router" in name:
            assert torch.equal(merged[name], tensor), name
    assert not any(name.endswith(("_blocks", "_scales")) for name in merged)


def test_mxfp4_merged_model_matches_peft_on_the_mxfp4_base(mxfp4):
    """OUT is a plain bf16 gpt-oss; its logits equal PEFT's on the model transformers loads from
    the MXFP4 checkpoint (dequantized on a CPU) to within that model's own noise."""
    assert "quantization_config" not in json.loads((mxfp4.merged / "config.json").read_text())

    def load(folder: Path, dtype: torch.dtype | None = None):
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", experts_implementation="eager"
        )

    merged_logits = prompt_logits(load(mxfp4.merged))
    reference = prompt_logits(load(mxfp4.merged, torch.float64), torch.float64)
    peft_model = PeftModel.from_pretrained(load(mxfp4.mxfp4), mxfp4.adapter).eval()
    peft_logits = prompt_logits(peft_model)
    with peft_model.disable_adapter():
        without_adapter = prompt_logits(peft_model)
    noise = float((peft_logits.double() - reference).abs().max())
    tolerance = 3 * noise + torch.finfo(torch.bfloat16).eps * float(reference.abs().max())
    assert float((merged_logits - peft_logits).abs().max()) <= tolerance
    assert float((peft_logits - without_adapter).abs().max()) > 5 * tolerance


def test_mxfp4_refusals(mxfp4, tmp_path):
    name = f"{EXPERTS}.down_proj"

    def drop_scales(tensors):
        tensors.pop(f"{name}_scales")

    def misfit_scales(tensors):
        tensors[f"{name}_scales"] = tensors[f"{name}_scales"][:, :, :1].contiguous()

    def nan_scale(tensors):
        tensors[f"{name}_scales"][1, 5, 0] = 255

    for index, (edit, words) in enumerate(
        [(drop_scales, "no"), (misfit_scales, "one exponent per 32"), (nan_scale, "NaN")]
    ):
        base = _edited_copy(mxfp4.mxfp4, tmp_path / f"base{index}", edit)
        message = _refused(base, mxfp4.adapter, tmp_path / f"out{index}")
        assert f"{name}_scales" in message and words in message, message


def test_merged_native_refuses_corrupt_scales_of_a_weight_it_would_copy(fp8, mxfp4, tmp_path):
    """merged_native copies a weight the adapter leaves alone as it is stored, without
    decoding it; its scales are still checked, as decoding checks them, before anything
    is written (issue 21's refusals hold for every save method)."""
    fp8_adapter = save_random_lora_adapter(fp8.base, tmp_path / "fp8-adapter", ["v_proj"], 41)

    def nan_fp8_scale(tensors):
        tensors[f"{Q_PROJ}_scale_inv"][1, 0] = torch.nan

    mxfp4_adapter = save_random_lora_adapter(mxfp4.base, tmp_path / "oss-adapter", ["q_proj"], 42)
    down_proj = f"{EXPERTS}.down_proj"

    def nan_exponent(tensors):
        tensors[f"{down_proj}_scales"][1, 5, 0] = 255

    cases = [
        (fp8.fp8, nan_fp8_scale, fp8_adapter, f"{Q_PROJ}_scale_inv"),
        (mxfp4.mxfp4, nan_exponent, mxfp4_adapter, f"{down_proj}_scales"),
    ]
    for index, (quantized, edit, adapter, scales) in enumerate(cases):
        base = _edited_copy(quantized, tmp_path / f"base{index}", edit)
        before = {p.name: p.read_bytes() for p in base.iterdir()}
        message = _refused(base, adapter, tmp_path / f"out{index}", save_method="merged_native")
        assert scales in message and "NaN" in message, message
        assert {p.name: p.read_bytes() for p in base.iterdir()} == before
        # The same base with its scales intact: the weight is copied, byte for byte.
        out = tmp_path / f"intact{index}"
        merge(
            MergeOptions(
                base=quantized, adapter=adapter, out=out, save_method="merged_native", quiet=True
            )
        )
        assert torch.equal(
            read_safetensors_directory(out)[scales],
            load_file(quantized / "model.safetensors")[scales],
        )


# --- FP8 per channel / per tensor (compressed-tensors) ---------------------------------------


def save_compressed_tensors_fp8(base: Path, directory: Path, preset: str) -> Path:
    """``base`` quantized by compressed-tensors' own FP8 compressor: the scheme ``preset``
    (``FP8_DYNAMIC``: a scale per channel; ``FP8``: one per tensor and a static input scale),
    scales from its ``calculate_qparams`` over each weight's min and max (what
    llm-compressor's min-max observer feeds it), the config its ``QuantizationConfig`` writes."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    per_channel = scheme.weights.strategy == QuantizationStrategy.CHANNEL
    tensors = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if not name.endswith("_proj.weight"):
            tensors[name] = tensor
            continue
        module = name.removesuffix(".weight")
        low = tensor.amin(dim=1, keepdim=True) if per_channel else tensor.amin()
        high = tensor.amax(dim=1, keepdim=True) if per_channel else tensor.amax()
        scale, _ = calculate_qparams(low, high, scheme.weights)
        state = {"weight": tensor, "weight_scale": scale}
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            state["input_scale"] = torch.tensor([0.0123], dtype=tensor.dtype)
        compressed = FloatQuantizationCompressor.compress(state, scheme)
        tensors.update({f"{module}.{key}": value for key, value in compressed.items()})
    quantization = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        format="float-quantized",
        quantization_status="compressed",
    )
    return save_quantized_model(
        base, directory, tensors, json.loads(quantization.model_dump_json())
    )


def compressed_tensors_dequantized(folder: Path, preset: str) -> dict[str, torch.Tensor]:
    """Every tensor as compressed-tensors' decompressor gives it (FP8 weights dequantized)."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    stored = load_file(folder / "model.safetensors")
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            module = name.removesuffix(".weight")
            state = {"weight": tensor, "weight_scale": stored[f"{module}.weight_scale"]}
            tensor = FloatQuantizationCompressor.decompress(state, scheme)["weight"]
        tensors[name] = tensor
    return tensors


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8"])
def test_compressed_tensors_fp8_rows_merge_and_refusals(fp8, tmp_path, preset):
    folder = save_compressed_tensors_fp8(fp8.base, tmp_path / "ct", preset)
    stored = load_file(folder / "model.safetensors")
    expected = compressed_tensors_dequantized(folder, preset)
    for name, tensor in expected.items():
        if stored[name].dtype != torch.float8_e4m3fn:
            continue
        scale = stored[f"{name.removesuffix('.weight')}.weight_scale"]
        exact = decode_fp8_float64(stored[name]) * scale.double()
        # The oracle's own check: q * s, exact in float64, rounded once to the scale's dtype.
        assert torch.equal(tensor, exact.to(torch.bfloat16)), name
        for step in (1, 7):
            assert torch.equal(read_all_rows(folder, name, step), tensor), name
    merged = tmp_path / "merged"
    merge(MergeOptions(base=folder, adapter=fp8.adapter, out=merged, max_memory=TILED_MAX_MEMORY))
    assert_merged_within_half_an_ulp(
        read_safetensors_directory(merged), expected, fp8.adapter, torch.bfloat16
    )
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())

    def drop_scale(tensors):
        tensors.pop(f"{Q_PROJ.removesuffix('.weight')}.weight_scale")

    message = _refused(
        _edited_copy(folder, tmp_path / "broken", drop_scale), fp8.adapter, tmp_path / "o"
    )
    assert repr(Q_PROJ) in message and "weight_scale" in message


# --- merged_native ---------------------------------------------------------------------------


def test_fp8_merged_native_is_transformers_quantizer_applied_to_the_16bit_merge(fp8, tmp_path):
    """Each merged weight's codes and ``weight_scale_inv`` are transformers' ``Fp8Quantize`` of
    the merged_16bit weight, bit for bit; the rest is OUT's 16-bit tensors; the config keeps
    the base's ``quantization_config``, and transformers loads OUT with its FP8 quantizer."""
    out = tmp_path / "native"
    merge(
        MergeOptions(
            base=fp8.fp8,
            adapter=fp8.adapter,
            out=out,
            save_method="merged_native",
            max_memory=TILED_MAX_MEMORY,
            quiet=True,
        )
    )
    native = read_safetensors_directory(out)
    merged = read_safetensors_directory(fp8.merged)
    quantizer, quantization_config = fp8_quantizer(FP8_BLOCK)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == (
        quantization_config
    )
    base_names = sorted(load_file(fp8.fp8 / "model.safetensors"))
    assert sorted(native) == base_names
    quantized = 0
    for name, tensor in merged.items():
        if name.endswith("_proj.weight"):
            expected = quantizer.convert({name: tensor})
            assert torch.equal(native[name].view(torch.uint8), expected[name].view(torch.uint8))
            assert torch.equal(native[f"{name}_scale_inv"], expected[f"{name}_scale_inv"])
            quantized += 1
        else:
            assert torch.equal(native[name], tensor), name
    assert quantized == len(LINEAR_MODULES)
    # transformers loads it with its FP8 quantizer (dequantizing on a CPU): its weights are the
    # dequantized native tensors.
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in merged:
        expected = native[name]
        if name.endswith("_proj.weight"):
            scales = native[f"{name}_scale_inv"]
            expected = Fp8Dequantize(None)._dequantize_one(expected, scales, torch.bfloat16)
        assert torch.equal(loaded[name], expected), name


def test_fp8_merged_native_partial_edge_blocks_and_untouched_weights(tmp_path):
    """A weight whose sides end inside a block (DeepSeek-V3's kv_a_proj_with_mqa) is quantized
    as if zero-padded; a quantized weight the adapter does not touch is copied as stored."""
    generator = torch.Generator().manual_seed(26)
    folder = tmp_path / "base"
    folder.mkdir()
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    other = "model.layers.0.self_attn.o_proj.weight"
    tensors = {}
    for name, shape in ((kv_a, (72, 80)), (other, (64, 64))):
        codes, scales = quantize_fp8_blocks_float64(
            torch.randn(shape, generator=generator), FP8_BLOCK
        )
        tensors |= {name: codes, f"{name}_scale_inv": scales}
    save_file(tensors, folder / "model.safetensors")
    config = {"dtype": "bfloat16", "quantization_config": fp8_quantizer(FP8_BLOCK)[1]}
    (folder / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora_a = torch.randn(4, 80, generator=generator) * 0.1
    lora_b = torch.randn(72, 4, generator=generator) * 0.1
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.kv_a_proj_with_mqa.lora_A.weight": lora_a,
            "base_model.model.model.layers.0.self_attn.kv_a_proj_with_mqa.lora_B.weight": lora_b,
        },
        adapter / "adapter_model.safetensors",
    )
    adapter_config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["kv_a_proj_with_mqa"],
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    plain, native = tmp_path / "plain", tmp_path / "native"
    merge(MergeOptions(base=folder, adapter=adapter, out=plain, quiet=True))
    merge(
        MergeOptions(
            base=folder, adapter=adapter, out=native, save_method="merged_native", quiet=True
        )
    )
    merged = read_safetensors_directory(plain)[kv_a]
    written = read_safetensors_directory(native)
    codes, scales = quantize_fp8_blocks_float64(merged, FP8_BLOCK)
    assert torch.equal(written[kv_a].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(written[f"{kv_a}_scale_inv"], scales)
    for name in (other, f"{other}_scale_inv"):
        assert torch.equal(written[name].view(torch.uint8), tensors[name].view(torch.uint8))


def test_compressed_tensors_fp8_merged_native_is_its_quantizer_on_the_16bit_merge(fp8, tmp_path):
    folder = save_compressed_tensors_fp8(fp8.base, tmp_path / "ct", "FP8_DYNAMIC")
    plain, native = tmp_path / "plain", tmp_path / "native"
    for out, method in ((plain, "merged_16bit"), (native, "merged_native")):
        merge(
            MergeOptions(
                base=folder,
                adapter=fp8.adapter,
                out=out,
                save_method=method,
                max_memory=TILED_MAX_MEMORY,
                quiet=True,
            )
        )
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    merged, written = read_safetensors_directory(plain), read_safetensors_directory(native)
    assert sorted(written) == sorted(load_file(folder / "model.safetensors"))
    config = json.loads((native / "config.json").read_text())["quantization_config"]
    assert config == json.loads((folder / "config.json").read_text())["quantization_config"]
    for name, tensor in merged.items():
        if not name.endswith("_proj.weight"):
            assert torch.equal(written[name], tensor), name
            continue
        module = name.removesuffix(".weight")
        low, high = tensor.amin(dim=1, keepdim=True), tensor.amax(dim=1, keepdim=True)
        scale, _ = calculate_qparams(low, high, scheme.weights)
        expected = FloatQuantizationCompressor.compress(
            {"weight": tensor, "weight_scale": scale}, scheme
        )
        assert torch.equal(written[name].view(torch.uint8), expected["weight"].view(torch.uint8))
        assert torch.equal(written[f"{module}.weight_scale"], expected["weight_scale"]), name


def test_merged_native_is_refused_where_it_cannot_be_faithful(fp8, tmp_path):
    message = _refused(fp8.base, fp8.adapter, tmp_path / "o1", save_method="merged_native")
    assert "not quantized" in message
    folder = save_compressed_tensors_fp8(fp8.base, tmp_path / "ct", "FP8")
    message = _refused(folder, fp8.adapter, tmp_path / "o2", save_method="merged_native")
    assert "per channel" in message and "llm-compressor" in message


def test_merged_4bit_on_fp8_names_the_format_and_the_save_methods_that_fit(fp8, tmp_path):
    """merged_4bit writes bitsandbytes 4-bit; an FP8 base is not 8-bit LLM.int8 (the message
    it got before) but FP8, which merged_native writes back."""
    message = _refused(fp8.fp8, fp8.adapter, tmp_path / "out", save_method="merged_4bit")
    assert "fp8 e4m3" in message
    assert "merged_native" in message and "merged_16bit" in message
    assert "LLM.int8" not in message


def compressed_tensors_mxfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' MXFP4 quantizer on one (out, in) matrix: ``calculate_qparams`` over
    each group of 32's min and max, then its packed compressor."""
    scheme = preset_name_to_scheme("MXFP4", ["Linear"])
    groups = weight.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), scheme.weights)
    return MXFP4PackedCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)


# Bands of a few of an expert's 64 or 96 logical rows, bands of about 50 (both cutting the
# groups of 32 rows that an exponent covers), and every expert in one tile.
@pytest.mark.parametrize("max_memory", [TILED_MAX_MEMORY, "40KB", "1GiB"])
def test_mxfp4_merged_native_is_compressed_tensors_quantizer_on_the_16bit_merge(
    mxfp4, tmp_path, max_memory
):
    """Each merged expert, transposed to gpt-oss' stored (out, in), quantized by
    compressed-tensors' MXFP4 quantizer: the same codes (gpt-oss' nibble order is its packing
    order) and exponents, bit for bit, whether the merged rows come in bands that cut the
    groups of 32 logical rows or whole experts; transformers loads OUT with its MXFP4
    quantizer."""
    out = tmp_path / "native"
    merge(
        MergeOptions(
            base=mxfp4.mxfp4,
            adapter=mxfp4.adapter,
            out=out,
            save_method="merged_native",
            max_memory=max_memory,
            quiet=True,
        )
    )
    written = read_safetensors_directory(out)
    merged = read_safetensors_directory(mxfp4.merged)
    assert sorted(written) == sorted(load_file(mxfp4.mxfp4 / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == GPT_OSS_QUANTIZATION_CONFIG
    for projection in ("gate_up_proj", "down_proj"):
        name = f"{EXPERTS}.{projection}"
        blocks, scales = written[f"{name}_blocks"], written[f"{name}_scales"]
        for expert, matrix in enumerate(merged[name]):
            expected = compressed_tensors_mxfp4(matrix.t().contiguous())
            assert torch.equal(blocks[expert].flatten(1), expected["weight_packed"]), name
            assert torch.equal(scales[expert], expected["weight_scale"]), name
    for name, tensor in merged.items():
        if not name.endswith("_proj") or "experts" not in name:
            assert torch.equal(written[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    state = loaded.state_dict()
    for projection in ("gate_up_proj", "down_proj"):
        name = f"{EXPERTS}.{projection}"
        assert torch.equal(state[name], transformers_mxfp4(written, name)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_quantizer_matches_compressed_tensors_on_edge_values(dtype):
    """Ties at every E2M1 threshold, all-zero and negative-zero groups, group maxima just below
    and above powers of two, tiny and large magnitudes."""
    thresholds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0, 0.5, 1.0, 3.0])
    rows = [
        torch.cat([thresholds, -thresholds, thresholds * 0.999, thresholds * 1.001])[:32],
        torch.zeros(32),
        -torch.zeros(32),
        torch.linspace(-1, 1, 32) * 2.0**-20,
        torch.linspace(-1, 1, 32) * 1000,
        torch.full((32,), 2.0**-3) * torch.tensor([1, -1] * 16),
        torch.randn(32, generator=torch.Generator().manual_seed(27)),
    ]
    values = torch.stack(rows).repeat(1, 2).to(dtype)
    blocks, exponents = quantize_mxfp4(values)
    expected = compressed_tensors_mxfp4(values)
    assert torch.equal(blocks.flatten(1), expected["weight_packed"])
    assert torch.equal(exponents, expected["weight_scale"])


def test_workspace_stays_within_the_bound_the_dry_run_counts(fp8, mxfp4):
    """What a reading thread holds for FP8 and MXFP4 rows stays within its format's
    ``workspace_bound``, which ``dequantize_workspace_bound`` (the figure ``--dry-run``'s
    memory line adds per thread) covers; and the dry run of a quantized base writes nothing."""
    for folder in (fp8.fp8, mxfp4.mxfp4):
        base = resolve_base(folder)
        with DequantizingReader(SafetensorsReader(base.entries), base.tensors) as reader:
            for name, tensor in base.tensors.items():
                if tensor.quantized is None:
                    continue
                row = math.prod(tensor.shape[1:])
                rows = max(1, 4096 // row)
                buffer = torch.empty(2 * rows * row, dtype=torch.uint8)
                for start in range(0, tensor.shape[0], rows):
                    reader.read_rows(name, start, min(tensor.shape[0], start + rows), buffer)
                tile_elements = rows * row
                cpu = torch.device("cpu")
                own = base.quantization.format_of[name].workspace_bound(tile_elements, cpu)
                assert own <= dequantize_workspace_bound(tile_elements, cpu)
                assert 0 < reader.workspace_nbytes() <= own, name
    preview = preview_merge(MergeOptions(base=fp8.fp8, adapter=fp8.adapter, out=fp8.base / "x"))
    assert "fp8 e4m3 (32x32 blocks)" in str(preview.quantization)
    assert not (fp8.base / "x").exists()


def test_fp8_matrix_read_in_one_large_call_stays_within_the_bound(tmp_path):
    """The stream reads an FP8 matrix in its I/O tiles, several times a tile's rows: one
    read of a matrix of 2.9M codes (three runs of ``FP8_READ_ELEMENTS``, the last partial)
    gives transformers' values, and what the thread holds stays within the FP8 bound for
    the tiles ``--dry-run`` counts (``CPU_TILE_WORKSPACE_BYTES``), whatever the read."""
    generator = torch.Generator().manual_seed(31)
    # Whole blocks of 128: with rows that are not (1500 of them, tried) transformers'
    # decoder is not the format's float64 decoding; partial blocks are checked against
    # that (test_partial_edge_blocks_take_their_blocks_scale).
    rows, cols = 1408, 2048
    values = torch.randn(rows, cols, generator=generator) * 100
    codes = values.clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(-(-rows // 128), cols // 128, generator=generator) * 1e-3
    name = "layers.0.mlp.down_proj.weight"
    folder = tmp_path / "base"
    folder.mkdir()
    save_file({name: codes, f"{name}_scale_inv": scales}, folder / "model.safetensors")
    config = {"dtype": "bfloat16", "quantization_config": fp8_quantizer((128, 128))[1]}
    (folder / "config.json").write_text(json.dumps(config))
    expected = Fp8Dequantize(None)._dequantize_one(codes, scales, torch.bfloat16)
    base = resolve_base(folder)
    with DequantizingReader(SafetensorsReader(base.entries), base.tensors) as reader:
        buffer = torch.empty(2 * rows * cols, dtype=torch.uint8)
        assert torch.equal(reader.read_rows(name, 0, rows, buffer), expected)
        tile_elements = CPU_TILE_WORKSPACE_BYTES // 2  # what working_memory_bound passes
        bound = base.quantization.format_of[name].workspace_bound(
            tile_elements, torch.device("cpu")
        )
        assert 0 < reader.workspace_nbytes() <= bound
