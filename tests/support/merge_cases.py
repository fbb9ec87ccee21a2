"""The merge scenarios of test_merge_vs_peft.py and how each must agree with PEFT."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig

LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PeftAgreement(enum.Enum):
    """How a merged tensor must relate to PEFT's merge_and_unload() result."""

    # PEFT rounds once, from float32, exactly as lora-merge does: results must be bit-identical.
    BIT_IDENTICAL = "bit-identical"
    # PEFT rounds twice (or computes at the output's own precision) where lora-merge rounds once
    # from a wider type: every element must be at least as close to the exact (float64) merge as
    # PEFT's, and at least one element of the tensor strictly closer. PEFT's extra rounding
    # changes hundreds to thousands of elements per case here, so if none is closer, lora-merge
    # is not doing the single rounding it promises.
    CLOSER_TO_EXACT = "closer to exact"
    # PEFT rounds once, but from float32 values that lora-merge computes in float64 (DoRA's
    # column norms): both are almost always correctly rounded, so they agree except where the
    # exact value sits within PEFT's float32 error of a rounding midpoint; there lora-merge
    # rounds correctly. Every element must be at least as close to exact as PEFT's.
    AT_LEAST_AS_CLOSE = "at least as close to exact"


@dataclass(frozen=True)
class MergeCase:
    """One base checkpoint + one adapter + one set of merge options."""

    id: str
    family: str  # key of tiny_checkpoints.TINY_MODEL_CONFIGS
    base_dtype: torch.dtype
    lora: dict  # LoraConfig keyword arguments (init_lora_weights=False is always added)
    peft_agreement: PeftAgreement  # for LoRA-adapted weights not matched by an override
    # (regex on the tensor name, agreement) pairs that take precedence over peft_agreement
    peft_agreement_overrides: tuple[tuple[str, PeftAgreement], ...] = ()
    output_dtype_option: str = "auto"
    max_shard_size: str = "5GB"
    expect_sharded_output: bool = False
    adapter_safe_serialization: bool = True

    @property
    def output_dtype(self) -> torch.dtype:
        return (
            self.base_dtype
            if self.output_dtype_option == "auto"
            else OUTPUT_DTYPES[self.output_dtype_option]
        )

    def lora_config(self) -> LoraConfig:
        return LoraConfig(init_lora_weights=False, **self.lora)

    def peft_agreement_for(self, tensor_name: str) -> PeftAgreement:
        for pattern, agreement in self.peft_agreement_overrides:
            if re.search(pattern, tensor_name):
                return agreement
        return self.peft_agreement


ALL_LINEAR_ALPHA_OVER_R = {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR_MODULES}

# Why each case expects what it does from PEFT (PEFT's base is loaded in the output dtype; the
# outcome was measured and the counts below are for these seeds):
#  * Linear/Conv1D, 16-bit output: PEFT keeps the adapter in float32 (autocast_adapter_dtype),
#    computes delta = (B @ A) * s in float32 and does `weight.data += delta`, which PyTorch
#    evaluates in float32 and rounds once to the weight's dtype: lora-merge's recipe exactly,
#    so the results are bit-identical.
#  * bf16 base -> fp16 output: PEFT's load casts W to fp16 first. That cast is exact except for
#    the 15 of ~107k weights below 2^-17 (where fp16 subnormals are coarser than bf16), and
#    those pre-roundings (< 2^-25) are far below the fp16 ulp of W + delta: still bit-identical.
#  * float32 output: lora-merge computes in float64 and rounds once, while PEFT rounds the
#    float32 delta and then the float32 sum. 41119 of 73728 adapted elements differ from PEFT for
#    the float32 base (879 for the bf16 base upcast to float32); all of them are closer to exact.
#  * Embedding, bf16: PEFT casts the delta to bf16 *before* adding it (two bf16 roundings):
#    4223 of 16384 elements differ, 4217 closer to exact and 6 equally close (ties).
MERGE_CASES = [
    MergeCase(
        id="llama-bf16-alpha-over-r-sharded",
        family="llama",
        base_dtype=torch.bfloat16,
        lora=ALL_LINEAR_ALPHA_OVER_R,
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        max_shard_size="64KB",
        expect_sharded_output=True,
    ),
    MergeCase(
        id="llama-fp32-alpha-over-r-single-file",
        family="llama",
        base_dtype=torch.float32,
        lora=ALL_LINEAR_ALPHA_OVER_R,
        peft_agreement=PeftAgreement.CLOSER_TO_EXACT,
    ),
    MergeCase(
        id="llama-bf16-rslora-bin-adapter",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={
            "r": 16,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        adapter_safe_serialization=False,
    ),
    MergeCase(
        id="llama-bf16-rank-and-alpha-patterns",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={
            "r": 4,
            "lora_alpha": 8,
            "target_modules": LLAMA_LINEAR_MODULES,
            # PEFT stores patterns with sorted keys and the first match (in that order) wins, so
            # layer 1's q_proj gets r=2 while layer 0's gets r=8.
            "rank_pattern": {
                "layers.1.self_attn.q_proj": 2,
                "model.layers.1.mlp.down_proj": 6,
                "q_proj": 8,
            },
            # "proj" must match nothing (it is not a dotted suffix of any module name), and for
            # up_proj the regex key comes first in sorted order, so it beats "up_proj": 24, not 3.
            "alpha_pattern": {
                "layers.1.self_attn.q_proj": 4,
                r"mlp\.(gate|up)_proj": 24,
                "proj": 1000,
                "q_proj": 32,
                "up_proj": 3,
            },
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        max_shard_size="64KB",
        expect_sharded_output=True,
    ),
    MergeCase(
        id="llama-bf16-embedding-lora",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={"r": 8, "lora_alpha": 4, "target_modules": ["embed_tokens", "q_proj", "v_proj"]},
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        peft_agreement_overrides=((r"embed_tokens", PeftAgreement.CLOSER_TO_EXACT),),
    ),
    MergeCase(
        id="llama-bf16-modules-to-save-lm-head",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "modules_to_save": ["lm_head"],
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="gpt2-bf16-conv1d-fan-in-fan-out",
        family="gpt2",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "fan_in_fan_out": True,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        max_shard_size="64KB",
        expect_sharded_output=True,
    ),
    MergeCase(
        id="qwen2-bf16-biased-attention",
        family="qwen2",
        base_dtype=torch.bfloat16,
        lora={"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR_MODULES},
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="llama-bf16-base-to-fp32-output",
        family="llama",
        base_dtype=torch.bfloat16,
        lora=ALL_LINEAR_ALPHA_OVER_R,
        peft_agreement=PeftAgreement.CLOSER_TO_EXACT,
        output_dtype_option="fp32",
    ),
    MergeCase(
        id="llama-bf16-base-to-fp16-output",
        family="llama",
        base_dtype=torch.bfloat16,
        lora=ALL_LINEAR_ALPHA_OVER_R,
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        output_dtype_option="fp16",
    ),
    MergeCase(
        id="qwen2-bf16-lora-bias",
        family="qwen2",
        base_dtype=torch.bfloat16,
        lora={"r": 8, "lora_alpha": 16, "lora_bias": True, "target_modules": ["q_proj", "v_proj"]},
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="qwen2-bf16-trained-biases-all",
        family="qwen2",
        base_dtype=torch.bfloat16,
        lora={"r": 8, "lora_alpha": 16, "bias": "all", "target_modules": ["q_proj", "o_proj"]},
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="qwen2-fp32-trained-biases-lora-only-and-lora-bias",
        family="qwen2",
        base_dtype=torch.float32,
        lora={
            "r": 4,
            "lora_alpha": 8,
            "bias": "lora_only",
            "lora_bias": True,
            "target_modules": ["k_proj", "v_proj"],
        },
        peft_agreement=PeftAgreement.CLOSER_TO_EXACT,
        # bias + 2 * b: the product is exact, so PEFT's float32 sum rounds once too.
        peft_agreement_overrides=((r"\.bias$", PeftAgreement.AT_LEAST_AS_CLOSE),),
    ),
    MergeCase(
        id="llama-bf16-trainable-tokens",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "trainable_token_indices": [3, 0, 255, 17],
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="llama-fp16-trainable-tokens-by-module",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["o_proj"],
            "trainable_token_indices": {"embed_tokens": [7, 100]},
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        output_dtype_option="fp16",
    ),
    MergeCase(
        id="phi3-bf16-fused-qkv-and-gate-up",
        family="phi3",
        base_dtype=torch.bfloat16,
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]},
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="phi3-bf16-dora-fused-qkv",
        family="phi3",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "use_dora": True,
            "target_modules": ["qkv_proj", "down_proj"],
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
    ),
    MergeCase(
        id="llama-bf16-dora-linear-and-embedding",
        family="llama",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "use_dora": True,
            "target_modules": [*LLAMA_LINEAR_MODULES, "embed_tokens"],
        },
        peft_agreement=PeftAgreement.BIT_IDENTICAL,
        peft_agreement_overrides=((r"embed_tokens", PeftAgreement.AT_LEAST_AS_CLOSE),),
        max_shard_size="64KB",
        expect_sharded_output=True,
    ),
    MergeCase(
        id="llama-fp32-dora",
        family="llama",
        base_dtype=torch.float32,
        lora={
            "r": 4,
            "lora_alpha": 8,
            "use_dora": True,
            "target_modules": ["q_proj", "down_proj", "embed_tokens"],
        },
        peft_agreement=PeftAgreement.CLOSER_TO_EXACT,
    ),
    MergeCase(
        id="gpt2-bf16-dora-conv1d-fan-in-fan-out",
        family="gpt2",
        base_dtype=torch.bfloat16,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "use_dora": True,
            "fan_in_fan_out": True,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
        },
        peft_agreement=PeftAgreement.AT_LEAST_AS_CLOSE,
    ),
]

MERGE_CASE_IDS = [case.id for case in MERGE_CASES]
