"""Llama-shaped INT4 checkpoints for benchmarks: compressed-tensors, GPTQ, AWQ and a bf16 twin.

Every linear of every layer is stored as its format lays it out (see
``src/lora_merge/io/formats/compressed_tensors_int.py`` and ``gptq_awq.py``) with
random codes and scales of a realistic magnitude; embeddings, norms and
``lm_head`` stay bf16. ``--format bf16`` writes the same shapes unquantized (random
bf16 values: the twin a merge of the same shapes is timed against; its values do
not matter to the timing). One shard per layer, so that memory holds one layer
while writing. Also writes one LoRA adapter (rank 16 on every linear) beside them.
Prints a JSON line ``{"base": ..., "adapter": ...}``.

Usage::

    .venv/bin/python benchmarks/synthetic_int_checkpoints.py --format gptq --workdir .bench/int
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # TinyLlama-1.1B's widths, a few layers.
    "llama-1b": {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 8192},
    # Llama-3.1-8B's widths (take --layers 1: 0.1 GB INT4, 0.4 GB bf16 a layer), small vocabulary.
    "llama-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 8192},
    "llama-mini": {"hidden": 512, "intermediate": 1408, "heads": 8, "kv_heads": 2, "vocab": 1024},
}
FORMATS = ("bf16", "compressed-tensors", "gptq", "awq")
GROUP_SIZE = 128


def linears(shape: dict[str, int]) -> dict[str, tuple[int, int]]:
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = hidden // shape["heads"] * shape["kv_heads"]
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def random_words(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(
        -(2**31), 2**31, (rows, columns), generator=generator, dtype=torch.int64
    ).to(torch.int32)


def quantized_linear(
    fmt: str, prefix: str, rows: int, columns: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    groups = columns // GROUP_SIZE
    if fmt == "bf16":
        return {
            f"{prefix}weight": (torch.randn(rows, columns, generator=generator) * 0.02).bfloat16()
        }
    if fmt == "compressed-tensors":
        return {
            f"{prefix}weight_packed": random_words(rows, columns // 8, generator),
            f"{prefix}weight_scale": (
                torch.rand(rows, groups, generator=generator) * 0.004 + 1e-3
            ).bfloat16(),
            f"{prefix}weight_shape": torch.tensor([rows, columns]),
        }
    scales = (torch.rand(groups, rows, generator=generator) * 0.004 + 1e-3).half()
    if fmt == "gptq":
        return {
            f"{prefix}qweight": random_words(columns // 8, rows, generator),
            f"{prefix}qzeros": random_words(groups, rows // 8, generator),
            f"{prefix}scales": scales,
            f"{prefix}g_idx": (torch.arange(columns) // GROUP_SIZE).to(torch.int32),
        }
    return {
        f"{prefix}qweight": random_words(columns, rows // 8, generator),
        f"{prefix}qzeros": random_words(groups, rows // 8, generator),
        f"{prefix}scales": scales,
    }


def quantization_config(fmt: str) -> dict[str, object] | None:
    if fmt == "compressed-tensors":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**weights, "group_size": GROUP_SIZE},
                    "format": "pack-quantized",
                }
            },
            "ignore": ["lm_head"],
            "quantization_status": "compressed",
        }
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP_SIZE,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": GROUP_SIZE,
            "zero_point": True,
            "version": "gemm",
        }
    return None


def build(shape_name: str, layers: int, fmt: str, workdir: Path) -> dict[str, str]:
    shape = SHAPES[shape_name]
    folder = workdir / f"{shape_name}-{layers}-{fmt}"
    adapter = workdir / f"{shape_name}-{layers}-adapter"
    generator = torch.Generator().manual_seed(0)
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        hidden, vocab = shape["hidden"], shape["vocab"]
        weight_map = {}
        for layer in range(layers):
            tensors = {}
            for module, (rows, columns) in linears(shape).items():
                prefix = f"model.layers.{layer}.{module}."
                tensors.update(quantized_linear(fmt, prefix, rows, columns, generator))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(hidden).bfloat16()
            name = f"model-{layer:05d}.safetensors"
            save_file(tensors, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
        ends = {
            "model.embed_tokens.weight": (
                torch.randn(vocab, hidden, generator=generator) * 0.02
            ).bfloat16(),
            "model.norm.weight": torch.ones(hidden).bfloat16(),
            "lm_head.weight": (torch.randn(vocab, hidden, generator=generator) * 0.02).bfloat16(),
        }
        save_file(ends, folder / "model-ends.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(ends, "model-ends.safetensors"))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        config: dict[str, object] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": shape["intermediate"],
            "num_hidden_layers": layers,
            "num_attention_heads": shape["heads"],
            "num_key_value_heads": shape["kv_heads"],
            "vocab_size": vocab,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
        }
        quantization = quantization_config(fmt)
        if quantization is not None:
            config["quantization_config"] = quantization
        (folder / "config.json").write_text(json.dumps(config))
    if not (adapter / "adapter_config.json").exists():
        adapter.mkdir(parents=True, exist_ok=True)
        rank = 16
        factors = {}
        for layer in range(layers):
            for module, (rows, columns) in linears(shape).items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                factors[f"{key}.lora_A.weight"] = (
                    torch.randn(rank, columns, generator=generator) * 0.01
                )
                factors[f"{key}.lora_B.weight"] = (
                    torch.randn(rows, rank, generator=generator) * 0.01
                )
        save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
        (adapter / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": rank,
                    "lora_alpha": 32,
                    "target_modules": [m.split(".")[1] for m in linears(shape)],
                    "base_model_name_or_path": None,
                }
            )
        )
    return {"base": str(folder), "adapter": str(adapter)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(build(args.shape, args.layers, args.format, args.workdir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
