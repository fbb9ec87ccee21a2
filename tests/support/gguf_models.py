"""Tiny Llama and Mixtral checkpoints that llama.cpp's GGUF converter accepts, and their adapters.

The converter reads a Llama vocabulary from ``tokenizer.json`` when it is a
byte-fallback BPE (a SentencePiece model converted to ``tokenizers``), so the
tokenizer here is one: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, and a
few pieces. Models are built from configs with every weight drawn at random,
bf16, and saved with ``save_pretrained``; the adapter is a PEFT LoRA with
non-zero B, saved with ``save_pretrained``. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tiny_checkpoints import ignoring_expected_peft_warnings, stable_seed
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
PIECES = ("▁", "a", "b", "▁a", "▁b")
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + len(PIECES)
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
}
# The LoRA each family gets: every Linear of a Llama block; on Mixtral the attention and the
# fused expert parameters (PEFT ``target_parameters``), which the converter stacks per block.
TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
TARGET_PARAMETERS = {
    "llama": None,
    "mixtral": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-fallback BPE tokenizer, as SentencePiece Llama models ship in tokenizer.json."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in PIECES:
        vocab[piece] = len(vocab)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[("▁", "a"), ("▁", "b")],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_convertible_base(family: str, directory: Path) -> Path:
    """A random bf16 ``family`` model with the Llama-style tokenizer, saved to ``directory``."""
    config: PretrainedConfig = FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(stable_seed("gguf-base", family))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(directory)
    llama_style_tokenizer().save_pretrained(directory)
    return directory


def save_lora_adapter(family: str, base: Path, directory: Path) -> Path:
    """A PEFT LoRA (rank 4, B drawn at random so the merge changes every target) on ``base``."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(stable_seed("gguf-adapter", family))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGET_MODULES[family],
        target_parameters=TARGET_PARAMETERS[family],
        init_lora_weights=False,
    )
    with ignoring_expected_peft_warnings():
        get_peft_model(model, config).save_pretrained(directory)
    return directory
