"""What a natively quantized base leaves unquantized passes through as it is stored.

Issue 21: "Modules that a format leaves unquantized (embeddings, norms, lm_head, routers,
modules_to_not_convert) pass through as they are." DeepSeek-V3's release stores each MoE
router's ``e_score_correction_bias`` in float32 beside bf16 tensors and FP8 weights, and
transformers keeps that buffer in float32 whatever dtype it loads with
(``_keep_in_fp32_modules_strict``). The oracle is transformers loading the FP8 checkpoint
(dequantized on a CPU): the merged model's bias must be that float32 buffer, bit for bit,
while the weights the format quantized come out in the model's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from native_formats import save_fp8_copy
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_checkpoints import save_random_lora_adapter
from transformers import AutoModelForCausalLM, DeepseekV3Config

from lora_merge import MergeOptions, merge
from lora_merge.api import preview_merge

pytestmark = [
    # The adapter names the 16-bit base it was made on; merging it into the FP8 copy is the
    # point.
    pytest.mark.filterwarnings("ignore::lora_merge.errors.LoraMergeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
BLOCK = (32, 32)


def save_tiny_deepseek_v3(directory: Path) -> Path:
    """A 2-layer DeepSeek-V3 (one dense layer, one MoE layer), every projection side a
    multiple of the FP8 block, with a router bias that bf16 cannot hold exactly."""
    config = DeepseekV3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(31)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    router = model.model.layers[1].mlp.gate
    # from_config casts every buffer to bf16; the release (and transformers loading it) keeps
    # this one in float32, so set it so.
    router.e_score_correction_bias = torch.randn(router.e_score_correction_bias.shape)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("deepseek")
    base = save_tiny_deepseek_v3(root / "base")
    fp8 = save_fp8_copy(base, root / "fp8", BLOCK)
    adapter = save_random_lora_adapter(base, root / "adapter", ["q_b_proj", "o_proj"], seed=32)
    return SimpleNamespace(base=base, fp8=fp8, adapter=adapter)


def stored_dtypes(folder: Path) -> dict[str, str]:
    dtypes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is no Mapping)
                dtypes[name] = handle.get_slice(name).get_dtype()
    return dtypes


@pytest.mark.parametrize("save_method", ["merged_16bit", "merged_native"])
def test_float32_router_bias_passes_through_as_transformers_keeps_it(
    deepseek_fp8, tmp_path, save_method
):
    stored = load_file(deepseek_fp8.fp8 / "model.safetensors")
    # The premise: the real writer stored the bias in float32 beside bf16 and FP8 tensors.
    assert stored[BIAS].dtype == torch.float32
    assert not torch.equal(stored[BIAS].bfloat16().float(), stored[BIAS])
    reference = AutoModelForCausalLM.from_pretrained(deepseek_fp8.fp8, dtype=torch.bfloat16)
    kept = reference.model.layers[1].mlp.gate.e_score_correction_bias
    assert kept.dtype == torch.float32

    out = tmp_path / "out"
    merge(
        MergeOptions(
            base=deepseek_fp8.fp8,
            adapter=deepseek_fp8.adapter,
            out=out,
            save_method=save_method,
            quiet=True,
        )
    )
    merged = load_file(out / "model.safetensors")
    assert merged[BIAS].dtype == torch.float32
    assert torch.equal(merged[BIAS], kept)
    # Every other tensor: as stored where the format left it unquantized; the FP8 weights
    # in the model's dtype (merged_16bit) or FP8 again (merged_native).
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            assert (name in merged) == (save_method == "merged_native"), name
        elif tensor.dtype == torch.float8_e4m3fn:
            expected = torch.float8_e4m3fn if save_method == "merged_native" else torch.bfloat16
            assert merged[name].dtype == expected, name
        else:
            assert merged[name].dtype == tensor.dtype, name
            if "q_b_proj" not in name and "o_proj" not in name:
                assert torch.equal(merged[name], tensor), name
    # The model card says which dtypes were written, counted from the files themselves.
    counts: dict[str, int] = {}
    for tensor in merged.values():
        name = str(tensor.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + 1
    card = (out / "README.md").read_text()
    for name, count in counts.items():
        assert f"{name} ({count})" in card, (name, count)
    if save_method == "merged_16bit":
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        # And transformers loads it with the same float32 bias.
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias, kept)


def test_dry_run_counts_the_float32_bias_at_four_bytes(deepseek_fp8, tmp_path):
    """The plan, not only the writer, keeps the float32: the dry run's output size is the
    written one."""
    out = tmp_path / "out"
    options = MergeOptions(base=deepseek_fp8.fp8, adapter=deepseek_fp8.adapter, out=out, quiet=True)
    planned = preview_merge(options)
    merge(options)
    assert stored_dtypes(out)[BIAS] == "F32"
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    header = (out / "model.safetensors").read_bytes()[:8]
    assert planned.output_bytes == written - 8 - int.from_bytes(header, "little")
