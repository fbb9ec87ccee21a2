"""Build a tiny Llama base model and a real PEFT LoRA adapter for it, offline.

Usage: python examples/build_tiny_model.py FOLDER

Writes FOLDER/base (bf16 safetensors in 3 shards + config.json) and
FOLDER/adapter (adapter_config.json + adapter_model.safetensors, r=8 on every
linear layer, B != 0 so the merge changes something). Nothing is downloaded:
the model is built from a config with random weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def build(folder: Path) -> None:
    """Create ``folder/base`` and ``folder/adapter``."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder / "base", max_shard_size="200KB")

    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,  # random B, as after training; PEFT's default starts at B = 0
    )
    get_peft_model(model, lora).save_pretrained(folder / "adapter")
    print(f"built {folder / 'base'} and {folder / 'adapter'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
