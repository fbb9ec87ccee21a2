"""Merged outputs pinned by sha256: a refactor that changes a byte of any of them fails here.

The pins were computed once, before the code was reorganised, and must never be
updated to make a refactor pass: a changed digest means the output changed.

For the pins to hold on every CPU, the inputs are chosen so that the merge's
arithmetic is exact whatever the kernels: every base value is a small multiple
of 2^-4, every LoRA factor a small multiple of 2^-3, the rank is 4 and the scale
2 (alpha/r). Each product in B @ A is then a multiple of 2^-6 below 2^-2, any
sum of them is exact in float32 (and in float64), so the order in which a
matmul adds (AVX-512, AVX2, scalar, another vendor's BLAS) cannot change a bit;
the one rounding to the output dtype is IEEE round-to-nearest-even of an exact
value. DoRA's column norms are sums of squares of such values, exact in
float64, and its square root and division are correctly rounded. The values
are drawn with Python's own ``random`` (stable across versions and platforms),
not torch's generator.

What is hashed: every file of OUT except the model card (``README.md``, which
names the lora-merge version and the command line), and each shard with the
``lora_merge.version``, ``lora_merge.base`` and ``lora_merge.adapter`` keys of
its metadata set aside (checked on their own), so that a release or the
temporary folder's name does not move the pins.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from merge_process import LORA_MERGE
from safetensors.torch import load_file, save_file

HIDDEN = 32
VOCAB = 48
LAYERS = 2
RANK = 4
ALPHA = 8


def exact_values(
    rng: random.Random, shape: tuple[int, ...], step: float, bound: int
) -> torch.Tensor:
    """Integers in [-bound, bound] times ``step``: few significant bits, so sums stay exact."""
    count = 1
    for size in shape:
        count *= size
    values = [rng.randint(-bound, bound) * step for _ in range(count)]
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def write_llama_base(folder: Path, dtype: torch.dtype) -> None:
    rng = random.Random(20261205)
    tensors = {
        "model.embed_tokens.weight": exact_values(rng, (VOCAB, HIDDEN), 2**-4, 16),
        "lm_head.weight": exact_values(rng, (VOCAB, HIDDEN), 2**-4, 16),
        "model.norm.weight": exact_values(rng, (HIDDEN,), 2**-4, 16),
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = exact_values(
            rng, (HIDDEN, HIDDEN), 2**-4, 16
        )
        tensors[f"{prefix}.self_attn.v_proj.weight"] = exact_values(
            rng, (HIDDEN // 2, HIDDEN), 2**-4, 16
        )
        tensors[f"{prefix}.input_layernorm.weight"] = exact_values(rng, (HIDDEN,), 2**-4, 16)
    tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    folder.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for index in range(2):
        file_name = f"model-{index + 1:05d}-of-00002.safetensors"
        part = {name: tensors[name] for name in names[index::2]}
        save_file(part, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, sort_keys=True))


def write_gpt2_base(folder: Path) -> None:
    """GPT-2 stores its projections as Conv1D, (in, out): the delta is transposed."""
    rng = random.Random(7)
    tensors = {
        "transformer.wte.weight": exact_values(rng, (VOCAB, HIDDEN), 2**-4, 16),
        "transformer.ln_f.weight": exact_values(rng, (HIDDEN,), 2**-4, 16),
    }
    for layer in range(LAYERS):
        prefix = f"transformer.h.{layer}"
        tensors[f"{prefix}.attn.c_attn.weight"] = exact_values(rng, (HIDDEN, 3 * HIDDEN), 2**-4, 16)
        tensors[f"{prefix}.attn.c_attn.bias"] = exact_values(rng, (3 * HIDDEN,), 2**-4, 16)
        tensors[f"{prefix}.attn.c_proj.weight"] = exact_values(rng, (HIDDEN, HIDDEN), 2**-4, 16)
    folder.mkdir(parents=True)
    save_file(
        {name: tensor.to(torch.float16) for name, tensor in tensors.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB,
        "n_embd": HIDDEN,
        "n_layer": LAYERS,
        "dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, sort_keys=True))


def write_adapter(
    folder: Path,
    modules: dict[str, tuple[int, int]],
    embeddings: dict[str, tuple[int, int]] | None = None,
    dora: dict[str, int] | None = None,
    **config: object,
) -> None:
    """``modules``: PEFT module path -> (out_features, in_features) of its LoRA."""
    rng = random.Random(4)
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = exact_values(rng, (RANK, in_features), 2**-3, 4)
        tensors[f"{prefix}.lora_B.weight"] = exact_values(rng, (out_features, RANK), 2**-3, 4)
    for module, (num_embeddings, dim) in (embeddings or {}).items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_embedding_A"] = exact_values(rng, (RANK, num_embeddings), 2**-3, 4)
        tensors[f"{prefix}.lora_embedding_B"] = exact_values(rng, (dim, RANK), 2**-3, 4)
    for module, out_features in (dora or {}).items():
        magnitude = exact_values(rng, (out_features,), 2**-2, 8).abs() + 1
        tensors[f"base_model.model.{module}.lora_magnitude_vector"] = magnitude
    folder.mkdir(parents=True)
    save_file(
        {name: t.to(torch.float32) for name, t in tensors.items()},
        folder / "adapter_model.safetensors",
    )
    settings = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in [*modules, *(embeddings or {})]}),
        "use_rslora": False,
        "use_dora": bool(dora),
        "fan_in_fan_out": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM",
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings, sort_keys=True))


LLAMA_QV = {
    f"model.layers.{layer}.self_attn.{name}": (out, HIDDEN)
    for layer in range(LAYERS)
    for name, out in (("q_proj", HIDDEN), ("v_proj", HIDDEN // 2))
}
GPT2_ATTN = {
    f"transformer.h.{layer}.attn.{name}": (out, HIDDEN)
    for layer in range(LAYERS)
    for name, out in (("c_attn", 3 * HIDDEN), ("c_proj", HIDDEN))
}


def build_case(case: str, folder: Path) -> tuple[Path, Path, tuple[str, ...]]:
    base, adapter = folder / "base", folder / "adapter"
    if case == "llama-bf16-qv":
        write_llama_base(base, torch.bfloat16)
        write_adapter(adapter, LLAMA_QV)
        return base, adapter, ()
    if case == "llama-fp32-to-fp16-resharded":
        write_llama_base(base, torch.float32)
        write_adapter(adapter, LLAMA_QV)
        return base, adapter, ("--dtype", "fp16", "--max-shard-size", "6KB")
    if case == "llama-bf16-embedding-and-lm-head":
        write_llama_base(base, torch.bfloat16)
        write_adapter(
            adapter,
            {"lm_head": (VOCAB, HIDDEN)},
            embeddings={"model.embed_tokens": (VOCAB, HIDDEN)},
        )
        return base, adapter, ()
    if case == "llama-fp32-dora":
        write_llama_base(base, torch.float32)
        write_adapter(adapter, LLAMA_QV, dora={m: out for m, (out, _) in LLAMA_QV.items()})
        return base, adapter, ()
    if case == "gpt2-fp16-conv1d":
        write_gpt2_base(base)
        write_adapter(adapter, GPT2_ATTN, fan_in_fan_out=True)
        return base, adapter, ()
    raise AssertionError(case)


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of each file of OUT; shards hashed with their version metadata set aside."""
    digests = {}
    for path in sorted(out.iterdir()):
        if path.name == "README.md":
            continue
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + length])
            metadata = header["__metadata__"]
            assert metadata.pop("lora_merge.version") == version("lora-merge")
            # The inputs' locations (temporary folders here) are part of the provenance.
            assert Path(metadata.pop("lora_merge.base")).name == "base"
            assert Path(metadata.pop("lora_merge.adapter")).name == "adapter"
            data = json.dumps(header, sort_keys=True).encode() + data[8 + length :]
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


# Computed with lora-merge at commit 6e425f9 (before the issue-15 reorganisation).
PINNED: dict[str, dict[str, str]] = {
    "llama-bf16-qv": {
        "config.json": "46941248ac64023d934d8b461620494bb6fa7621d4208149a2b34f6891ca767c",
        "model.safetensors": "a34ac0f824d00b3b0cec310923720d9e9542289a05b292a3897d016c49123311",
    },
    "llama-fp32-to-fp16-resharded": {
        "config.json": "66576907f7c88555321c60dbab46e35af1f205ffde611779abb6b1d99f765311",
        "model-00001-of-00003.safetensors": "580c0e2aada2cb7475aec0bccd620f01ac574d3eea1d12fb1dd077890c9c16c6",
        "model-00002-of-00003.safetensors": "287a59f6a28299be6bebdfd6c2d9fccb60b26a45f79b8aa554d672bf8f5bdc0f",
        "model-00003-of-00003.safetensors": "8d4792eb16217e9e09fcef0e6dd4ec2adf670ee8b914ce0e72822db1b7cb950a",
        "model.safetensors.index.json": "a1afa606f684a95c68815961ea8a10a8bccc73405ab4748ac99cb96d79ab2fd9",
    },
    "llama-bf16-embedding-and-lm-head": {
        "config.json": "46941248ac64023d934d8b461620494bb6fa7621d4208149a2b34f6891ca767c",
        "model.safetensors": "aa77ecd82269b212532daecf5605778270d5d66ef2ab334d8ea5db2729cb5b33",
    },
    "llama-fp32-dora": {
        "config.json": "51cb19e339f4495dbfe651836018d1cb0854d262b3f43aec6ead816f93b7d0ca",
        "model.safetensors": "382705425393c7acc96add18c160dbba15a40773fe9701e7eedad353d29c2d6d",
    },
    "gpt2-fp16-conv1d": {
        "config.json": "2f817c5f5ad7c6def43af34b33c8410eb98205c41d603291faeb5e69eb24fb5d",
        "model.safetensors": "d2c568eba65519414a5d8c00870dcdcefdfb4ea21d66837b33a8697424871785",
    },
}


@pytest.mark.parametrize(
    "case",
    [
        "llama-bf16-qv",
        "llama-fp32-to-fp16-resharded",
        "llama-bf16-embedding-and-lm-head",
        "llama-fp32-dora",
        "gpt2-fp16-conv1d",
    ],
)
def test_merged_output_is_pinned(case, tmp_path):
    base, adapter, options = build_case(case, tmp_path)
    out = tmp_path / "merged"
    result = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(out), "--quiet", *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert output_digests(out) == PINNED[case]


def test_the_pinned_arithmetic_is_exact(tmp_path):
    """The premise of the pins: each merged tensor is the float64 merge, rounded once.

    If this ever fails, a pin could depend on the CPU; fix the inputs, not the pins.
    """
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    result = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(out), "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    merged = load_file(out / "model.safetensors")
    factors = load_file(adapter / "adapter_model.safetensors")
    originals: dict[str, torch.Tensor] = {}
    for shard in base.glob("*.safetensors"):
        originals.update(load_file(shard))
    for name, weight in originals.items():
        exact = weight.double()
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in factors:
            b_times_a = (
                factors[f"{prefix}.lora_B.weight"].double()
                @ factors[f"{prefix}.lora_A.weight"].double()
            )
            exact = exact + (ALPHA / RANK) * b_times_a
        assert torch.equal(merged[name], exact.to(weight.dtype)), name
