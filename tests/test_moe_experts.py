"""LoRA on fused MoE expert parameters (PEFT ``target_parameters``) against PEFT and float64.

Two tiny MoE models that transformers 5 ships, covering both ways checkpoints store experts:

* Qwen3-MoE: the model fuses ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj``
  (E, H, I), but its checkpoint keeps one ``gate_proj`` / ``up_proj`` / ``down_proj`` per expert
  (transformers converts on load and back on save); bf16.
* Mixtral: the same, but its checkpoint names them ``block_sparse_moe.experts.{e}.w1/w3/w2``;
  float32.
* gpt-oss: the checkpoint stores the fused tensors, transposed ((E, in, out), PEFT's
  ``is_transposed``); float32.

Both LoRAs target the two expert parameters of a block (PEFT nests them: ``experts.lora_A`` and
``experts.base_layer.lora_A``) and q_proj. PEFT's ParamWrapper merge rounds the delta to the
weight's dtype before adding it (two roundings); lora-merge rounds once, so every element must be
at least as close to the float64 merge as PEFT's and within half an ulp of it.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from merge_oracle import (
    FLOAT32_UNIT_ROUNDOFF,
    FLOAT64_UNIT_ROUNDOFF,
    first_matching_pattern_value,
    read_safetensors_directory,
    ulp,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_checkpoints import unmerged_tolerance
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from lora_merge import MergeOptions, merge
from lora_merge.errors import AdapterMismatchError, InvalidInputError

PROMPT = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(7))
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _qwen3_moe() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )


def _mixtral() -> MixtralConfig:
    return MixtralConfig(
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )


def _gpt_oss() -> GptOssConfig:
    return GptOssConfig(
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


@dataclass(frozen=True)
class MoeCase:
    id: str
    config: object
    dtype: torch.dtype
    rank: int
    alpha: int
    fused_in_checkpoint: bool
    alpha_pattern: dict[str, int] = field(default_factory=dict)


CASES = [
    # PEFT matches alpha_pattern against the parameter's full name: gate_up_proj gets alpha 5.
    MoeCase(
        "qwen3-moe-bf16-per-expert", _qwen3_moe, torch.bfloat16, 2, 3, False, {"gate_up_proj": 5}
    ),
    MoeCase("mixtral-fp32-per-expert-w1-w3", _mixtral, torch.float32, 2, 4, False),
    MoeCase("gpt-oss-fp32-fused-transposed", _gpt_oss, torch.float32, 4, 8, True),
]


@dataclass(frozen=True)
class Built:
    base: Path
    adapter: Path
    out: Path
    peft_merged: dict[str, torch.Tensor]
    peft_logits: torch.Tensor
    float64_logits: torch.Tensor


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def built(request, tmp_path_factory) -> tuple[MoeCase, Built]:
    with warnings.catch_warnings():
        # PEFT 0.21 warns that an alpha_pattern key naming a target parameter "did not match any
        # targeted module and [was] ignored", yet applies it (its merge and logits show alpha 5).
        warnings.filterwarnings("ignore", message="The following alpha_pattern keys did not match")
        return _build(request.param, tmp_path_factory)


def _build(case: MoeCase, tmp_path_factory) -> tuple[MoeCase, Built]:
    root = tmp_path_factory.mktemp(case.id)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(case.config(), dtype=case.dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape)
            value = 1 + 0.1 * noise if "norm" in name else 0.05 * noise
            parameter.copy_(value.to(parameter.dtype))
    model.save_pretrained(root / "base")
    lora = LoraConfig(
        r=case.rank,
        lora_alpha=case.alpha,
        target_modules=["q_proj"],
        target_parameters=EXPERT_PARAMETERS,
        alpha_pattern=case.alpha_pattern,
        init_lora_weights=False,
    )
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    merge(MergeOptions(base=root / "base", adapter=root / "adapter", out=root / "out", quiet=True))

    def peft_model(dtype: torch.dtype) -> PeftModel:
        base = AutoModelForCausalLM.from_pretrained(
            root / "base", dtype=dtype, experts_implementation="eager"
        )
        return PeftModel.from_pretrained(base, root / "adapter").eval()

    with torch.no_grad():
        unmerged = peft_model(case.dtype)
        peft_logits = unmerged(input_ids=PROMPT).logits.float()
        peft_merged = {k: v.clone() for k, v in unmerged.merge_and_unload().state_dict().items()}
        float64_logits = peft_model(torch.float64).double()(input_ids=PROMPT).logits
    return case, Built(
        root / "base", root / "adapter", root / "out", peft_merged, peft_logits, float64_logits
    )


def _float64_expert_delta(adapter: dict[str, torch.Tensor], module: str, experts: int):
    """PEFT's ParamWrapper.get_delta_weight, restated in float64: (E, out, in)."""
    lora_a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    lora_b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])  # (E, r, in)
    b = lora_b.reshape(lora_b.shape[0], -1, experts)  # (out, r, E)
    return torch.einsum("ore,eri->eoi", b, a), torch.einsum("ore,eri->eoi", b.abs(), a.abs())


def test_expert_loras_merge_closer_to_float64_than_peft(built):
    case, inputs = built
    ours = AutoModelForCausalLM.from_pretrained(inputs.out, dtype=case.dtype).state_dict()
    base = AutoModelForCausalLM.from_pretrained(inputs.base, dtype=case.dtype).state_dict()
    adapter = read_safetensors_directory(inputs.adapter)
    experts = base["model.layers.0.mlp.experts.down_proj"].shape[0]
    # The nested wrappers: the inner one (base_layer) holds the parameter listed first by PEFT's
    # sorted target_parameters... which one is which is decided by shape, as lora-merge does.
    deltas = {}
    for module in ("model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"):
        delta, magnitude = _float64_expert_delta(adapter, module, experts)
        for parameter in ("down_proj", "gate_up_proj"):
            shape = base[f"model.layers.0.mlp.experts.{parameter}"].shape
            if delta.shape == shape:
                deltas[parameter] = (delta, magnitude)
            elif delta.transpose(1, 2).shape == shape:
                deltas[parameter] = (delta.transpose(1, 2), magnitude.transpose(1, 2))
    assert set(deltas) == {"down_proj", "gate_up_proj"}
    q_a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    q_b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    deltas["q"] = (q_b @ q_a, q_b.abs() @ q_a.abs())

    strictly_closer = 0
    for short, name in (
        ("down_proj", "model.layers.0.mlp.experts.down_proj"),
        ("gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj"),
        ("q", "model.layers.0.self_attn.q_proj.weight"),
    ):
        delta, magnitude = deltas[short]
        alpha = first_matching_pattern_value(case.alpha_pattern, name.removesuffix(".weight"))
        scale = (alpha or case.alpha) / case.rank
        exact = base[name].double() + scale * delta
        # A length-r dot product, the scaling and the sum with W, evaluated in float32 for
        # 16-bit outputs and in float64 for float32 ones (and by this test in float64).
        unit = FLOAT64_UNIT_ROUNDOFF if case.dtype == torch.float32 else FLOAT32_UNIT_ROUNDOFF
        bound = (
            (case.rank + 2)
            * (unit + FLOAT64_UNIT_ROUNDOFF)
            * (base[name].double().abs() + scale * magnitude)
        )
        our_error = (ours[name].double() - exact).abs()
        peft_error = (inputs.peft_merged[name].double() - exact).abs()
        assert not torch.equal(ours[name], base[name]), name
        assert bool((our_error <= 0.5 * ulp(exact, case.dtype) + bound).all()), name
        assert bool((our_error <= peft_error + bound).all()), name
        if short != "q":
            strictly_closer += int((our_error < peft_error).sum())
    # PEFT's double rounding moves many expert elements. Counted for these seeds, elements that
    # differ from PEFT (all of them strictly closer to float64): Qwen3-MoE bf16 down_proj 859
    # (858 closer, 1 a tie) of 3072, gate_up_proj 1695 of 6144, q_proj 0 (bit-identical);
    # gpt-oss fp32 1349 of 3072, 2575 of 6144, q_proj 456 of 1024. Max error 0.5 ulp.
    assert strictly_closer > 100
    adapted = ("experts.gate_up_proj", "experts.down_proj", "self_attn.q_proj.weight")
    for name, tensor in ours.items():  # everything else: exactly the base
        if not name.endswith(adapted):
            assert torch.equal(tensor, base[name]), name


def test_checkpoint_layout_is_kept(built):
    case, inputs = built
    with safe_open(next(inputs.base.glob("*.safetensors")), "pt") as handle:
        base_keys = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118
    with safe_open(next(inputs.out.glob("*.safetensors")), "pt") as handle:
        out_keys = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118
    assert out_keys == base_keys
    per_expert = any(".experts.0." in key for key in base_keys)
    assert per_expert != case.fused_in_checkpoint


def test_merged_logits_match_the_unmerged_peft_model(built):
    case, inputs = built
    merged = AutoModelForCausalLM.from_pretrained(inputs.out, dtype=case.dtype).eval()
    with torch.no_grad():
        logits = merged(input_ids=PROMPT).logits.float()
    tolerance = unmerged_tolerance(inputs.peft_logits, inputs.float64_logits, case.dtype)
    assert float((logits - inputs.peft_logits).abs().max()) <= tolerance


def test_verify_recomputes_expert_rows(built, tmp_path):
    _, inputs = built
    summary = merge(
        MergeOptions(
            base=inputs.base,
            adapter=inputs.adapter,
            out=tmp_path / "out",
            quiet=True,
            verify=True,
            max_memory="16KB",  # tiles of one expert (or a few rows) at a time
        )
    )
    # Reports count adapter modules, not the per-expert tensors they feed.
    assert summary.lora_modules_by_layer == {"experts": 2, "linear": 1}
    # Tiling changes no bit (the float64 check of these tensors is the test above).
    tiled = read_safetensors_directory(tmp_path / "out")
    whole = read_safetensors_directory(inputs.out)
    assert tiled.keys() == whole.keys()
    assert all(torch.equal(tiled[name], whole[name]) for name in whole)
    assert (tmp_path / "out" / "config.json").is_file()


def test_unmerging_expert_loras_returns_the_base(built, tmp_path):
    """Merge then --unmerge: within one ulp of max(|W|, |merged|) (see test_unmerge.py)."""
    case, inputs = built
    merge(
        MergeOptions(
            base=inputs.out,
            adapter=inputs.adapter,
            out=tmp_path / "back",
            quiet=True,
            unmerge=True,
            verify=True,  # the sampled rows recomputed with the negated scale
        )
    )
    base = read_safetensors_directory(inputs.base)
    merged = read_safetensors_directory(inputs.out)
    back = read_safetensors_directory(tmp_path / "back")
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    assert any("experts" in name for name in changed)
    for name in changed:
        larger = torch.maximum(base[name].double().abs(), merged[name].double().abs())
        distance = (back[name].double() - base[name].double()).abs()
        assert bool((distance <= ulp(larger, case.dtype)).all()), name
        assert float((back[name] == base[name]).float().mean()) > 0.2, name


def test_experts_missing_from_the_checkpoint_are_reported(built, tmp_path):
    """A checkpoint with fewer experts than config.json declares is refused, not guessed at
    (with 3 of 4 experts, A's r·E rows could be read with another r)."""
    _, inputs = built
    base = tmp_path / "base"
    shutil.copytree(inputs.base, base)
    tensors = read_safetensors_directory(base)
    kept = {  # drop expert 3: its own tensors, or its slice of the fused ones
        name: t[:3] if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else t
        for name, t in tensors.items()
        if ".experts.3." not in name
    }
    assert sum(t.numel() for t in kept.values()) < sum(t.numel() for t in tensors.values())
    for file in base.glob("*.safetensors*"):
        file.unlink()
    save_file(kept, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterMismatchError, match="has 3 experts in BASE's weights but"):
        merge(MergeOptions(base=base, adapter=inputs.adapter, out=tmp_path / "out", quiet=True))


def test_combining_expert_loras_is_refused(built, tmp_path):
    """--combine would concatenate A and B, breaking the experts' interleaved layout."""
    _, inputs = built
    with pytest.raises(InvalidInputError, match="--combine cannot combine"):
        merge(
            MergeOptions(
                base=inputs.base, adapter=[inputs.adapter, inputs.adapter], out=tmp_path / "out"
            )
        )
    assert not (tmp_path / "out").exists()
