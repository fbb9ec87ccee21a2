"""Small checkpoints written directly with safetensors, for tests that need files, not models.

The merge tests against PEFT build real models with transformers; the error and
format tests only need valid (or deliberately broken) files, fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 64
VOCAB = 128
LAYERS = 2


def base_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict (q/v projections, norms, embeddings, lm_head)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=generator),
        "model.norm.weight": torch.ones(HIDDEN),
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = torch.randn(
            HIDDEN, HIDDEN, generator=generator
        )
        tensors[f"{prefix}.self_attn.v_proj.weight"] = torch.randn(
            HIDDEN // 2, HIDDEN, generator=generator
        )
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(HIDDEN)
    return {name: tensor.to(dtype) for name, tensor in tensors.items()}


def write_base(folder: Path, shards: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a base folder (sharded with an index when ``shards > 1``); return its tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = base_tensors(seed)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for index in range(shards):
            file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[index::shards]}
            save_file(part, folder / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_data))
    config = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def adapter_tensors(rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """LoRA A/B for every q_proj and v_proj, PEFT key names, float32."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, out_features in (("q_proj", HIDDEN), ("v_proj", HIDDEN // 2)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, HIDDEN, generator=generator) * 0.1
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.1
            )
    return tensors


def adapter_config(**overrides: object) -> dict[str, object]:
    """An adapter_config.json as PEFT writes it (the fields that matter)."""
    config: dict[str, object] = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM",
    }
    config.update(overrides)
    return config


def write_adapter(
    folder: Path, tensors: dict[str, torch.Tensor] | None = None, **config_overrides: object
) -> dict[str, torch.Tensor]:
    """Write an adapter folder; return its tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors() if tensors is None else tensors
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(**config_overrides)))
    return tensors


def write_big_base_and_adapter(
    root: Path, tensors: int = 24, side: int = 1024
) -> tuple[Path, Path]:
    """A float32 base of ``tensors`` square tensors (~100 MB by default), written in many tiles.

    One LoRA module on the first tensor; the rest are converted when ``--dtype``
    asks for it. Tests that act mid-write stop the merge at a known point
    (merge_process.py), so the size only has to leave work after that point.
    """
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    weights = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.full((side, side), 0.5)
        for i in range(tensors)
    }
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    lora = {
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.ones(2, side),
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.ones(side, 2),
    }
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    return base, adapter
