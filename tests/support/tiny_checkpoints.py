"""Build tiny, fully offline Hugging Face checkpoints and PEFT LoRA adapters for the merge tests.

Every model is created from a config (never downloaded), every random draw is seeded, and all
parameters (including norms and biases, which Hugging Face initialises to constants) are
re-drawn so that no tensor is trivially zero or one.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.utils import ModulesToSaveWrapper
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

EXPECTED_PEFT_WARNINGS = (
    "The following alpha_pattern keys did not match any targeted module",
    "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`",
    # PEFT 0.21 mistakes lora_bias=True's 1-D lora_B.bias for an unsharded ZeRO-3 tensor.
    r"Adapter '\w+': \d+ LoRA tensor\(s\) have invalid shape",
    # lora_bias=True on a layer without a bias: PEFT cannot merge it, lora-merge can.
    "`lora_bias=True` was passed but the targeted layer",
    # A LoRA on a tied embedding or head without ensure_weight_tying (PEFT #2777).
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
)
TINY_VOCAB_SIZE = 256
TINY_HIDDEN_SIZE = 64
# The sizes the Llama-like tiny models (Llama, Qwen2, Phi-3) share.
TINY_DECODER_SIZES: dict[str, int | bool] = {
    "hidden_size": TINY_HIDDEN_SIZE,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": TINY_VOCAB_SIZE,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
BASE_CHECKPOINT_SHARD_SIZE = "100KB"


def _llama_config() -> PretrainedConfig:
    return LlamaConfig(**TINY_DECODER_SIZES)


def _gpt2_config() -> PretrainedConfig:
    # GPT-2 ties lm_head to wte, so its checkpoint has no lm_head.weight; its projections are
    # transformers' Conv1D, which stores weights as (in_features, out_features).
    return GPT2Config(
        n_embd=TINY_HIDDEN_SIZE,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=TINY_VOCAB_SIZE,
        bos_token_id=0,
        eos_token_id=0,
    )


def _qwen2_config() -> PretrainedConfig:
    # Qwen2 has biases on q_proj/k_proj/v_proj (but not o_proj or the MLP).
    return Qwen2Config(**TINY_DECODER_SIZES)


def _phi3_config() -> PretrainedConfig:
    # Phi-3 fuses q, k and v into one qkv_proj, and gate and up into gate_up_proj.
    return Phi3Config(**TINY_DECODER_SIZES, pad_token_id=0)


def _tied_llama_config() -> PretrainedConfig:
    # lm_head reuses embed_tokens, so the checkpoint has no lm_head.weight (as Gemma, Qwen2-0.5B).
    config = _llama_config()
    config.tie_word_embeddings = True
    return config


TINY_MODEL_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama_config,
    "llama-tied": _tied_llama_config,
    "phi3": _phi3_config,
    "gpt2": _gpt2_config,
    "qwen2": _qwen2_config,
}


# A fixed prompt: 2 sequences of 12 random token ids.
PROMPT_INPUT_IDS = torch.randint(
    0, TINY_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(1234)
)


def prompt_logits(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of `model` on PROMPT_INPUT_IDS, converted to `dtype`."""
    with torch.no_grad():
        return model(input_ids=PROMPT_INPUT_IDS).logits.to(dtype)


# The merged and the unmerged model compute the same function in another order: merging
# reassociates W x + s B (A x) into (W + s B A) x and rounds the merged weight once, and every
# activation is rounded to the model's dtype along the way. No fixed tolerance fits every dtype,
# model and CPU (other kernels round differently), so each comparison measures its own noise:
# E, the distance of the unmerged model's output from a float64 evaluation of the same model.
# The merged model may be at most 2E from float64 (as accurate as the unmerged model up to a
# factor 2), hence at most 3E from the unmerged output, plus one eps of the dtype at the output
# scale so that a lucky, near-exact E cannot make the check flaky. (A mis-scaled or
# mis-transposed delta moves the output by the order of the scale.)
NOISE_MULTIPLE = 3.0


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a model (adapters included), for the reference of its own output."""
    return copy.deepcopy(model).double()


def unmerged_tolerance(
    unmerged: torch.Tensor, float64_reference: torch.Tensor, dtype: torch.dtype
) -> float:
    """How far a merged model's output may be from the unmerged model's (see NOISE_MULTIPLE)."""
    reference = float64_reference.double()
    noise = float((unmerged.double() - reference).abs().max())
    return NOISE_MULTIPLE * noise + torch.finfo(dtype).eps * float(reference.abs().max())


def stable_seed(*parts: object) -> int:
    """A seed that depends only on `parts` (unlike hash(), which is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _is_norm_weight(parameter_name: str) -> bool:
    return parameter_name.endswith(".weight") and (
        "norm" in parameter_name or ".ln_" in parameter_name
    )


@torch.no_grad()
def _redraw_all_parameters(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Give every parameter a seeded random value: norms near 1, everything else ~N(0, 0.02^2)."""
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        value = 1.0 + 0.1 * noise if _is_norm_weight(name) else 0.02 * noise
        parameter.copy_(value.to(parameter.dtype))


def save_tiny_base_checkpoint(family: str, dtype: torch.dtype, directory: Path) -> Path:
    """Create a random tiny `family` model in `dtype` and save it, sharded, to `directory`."""
    config = TINY_MODEL_CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _redraw_all_parameters(
        model, torch.Generator().manual_seed(stable_seed("base", family, str(dtype)))
    )
    model.save_pretrained(directory, max_shard_size=BASE_CHECKPOINT_SHARD_SIZE)
    return directory


@torch.no_grad()
def _perturb_weights_saved_in_full(peft_model: PeftModel, generator: torch.Generator) -> None:
    """Make full tensors that PEFT stores in the adapter differ from the base checkpoint, and
    DoRA magnitudes differ from their initial norms.

    PEFT saves modules_to_save copies (e.g. lm_head) and, when an embedding is a LoRA target,
    the embedding's base weight. Right after get_peft_model they equal the base tensors, so a
    merger that ignored them would go unnoticed; perturbing them (as training or a vocab resize
    would) makes "the adapter's copy replaces the base tensor" observable.
    """
    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            targets = list(module.modules_to_save["default"].parameters())
        elif isinstance(module, LoraEmbedding):
            targets = [module.base_layer.weight]
        else:
            continue
        for tensor in targets:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.copy_((tensor.float() + 0.01 * noise).to(tensor.dtype))
    # Biases PEFT trains and saves (bias="all" or "lora_only") start as the base's: move them.
    for name, parameter in peft_model.named_parameters():
        if name.endswith(".bias") and parameter.requires_grad and "lora_" not in name:
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((0.01 * noise).to(parameter.dtype))
    # Trainable tokens start as copies of their rows: move them, as training does.
    for name, parameter in peft_model.named_parameters():
        if "trainable_tokens_delta" in name:
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((0.01 * noise).to(parameter.dtype))
    # DoRA starts with m = ||W + s B A||, which makes m / ||V|| = 1: move m, as training does,
    # so that the rescaling is observable.
    for name, parameter in peft_model.named_parameters():
        if "lora_magnitude_vector" in name:
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.mul_(1.0 + 0.2 * noise.to(parameter.dtype))


@contextlib.contextmanager
def ignoring_expected_peft_warnings() -> Iterator[None]:
    """Silence what the cases trigger on purpose: a pattern key that matches nothing, and PEFT
    announcing that it saves a targeted embedding's base weight."""
    with warnings.catch_warnings():
        for expected_message in EXPECTED_PEFT_WARNINGS:
            warnings.filterwarnings("ignore", message=expected_message)
        yield


def load_peft_model(base_model: PreTrainedModel, adapter_directory: Path) -> PeftModel:
    """PeftModel.from_pretrained with its defaults (autocast_adapter_dtype=True keeps the LoRA
    factors in float32), in eval mode."""
    with ignoring_expected_peft_warnings():
        return PeftModel.from_pretrained(base_model, adapter_directory).eval()


def save_tiny_lora_adapter(
    base_directory: Path,
    base_dtype: torch.dtype,
    lora_config: LoraConfig,
    directory: Path,
    *,
    seed: int,
    safe_serialization: bool,
) -> Path:
    """Attach a randomly initialised LoRA (B != 0) to the base; save the adapter to `directory`."""
    model = AutoModelForCausalLM.from_pretrained(base_directory, dtype=base_dtype)
    torch.manual_seed(seed)  # init_lora_weights=False draws A and B from torch's global RNG
    with ignoring_expected_peft_warnings():
        peft_model = get_peft_model(model, lora_config)
        _perturb_weights_saved_in_full(peft_model, torch.Generator().manual_seed(seed + 1))
        peft_model.save_pretrained(directory, safe_serialization=safe_serialization)
    return directory


def save_random_bf16_llama(directory: Path, intermediate_size: int, seed: int) -> Path:
    """A one-layer bf16 Llama with random weights whose sizes a quantizer takes.

    Hidden 64 and every linear side a multiple of 32, so that block quantizers
    (transformers' FP8, bitsandbytes) quantize every projection; ``intermediate_size``
    picks how rows fall on quantization blocks.
    """
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,  # PROMPT_INPUT_IDS draws from 256 ids
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            value = 1.0 + 0.1 * noise if "norm" in name else 0.02 * noise
            parameter.copy_(value.to(parameter.dtype))
    model.save_pretrained(directory)
    return directory


def save_random_lora_adapter(
    base: Path, directory: Path, target_modules: list[str], seed: int
) -> Path:
    """A rank-4 PEFT LoRA with random A and B (B != 0) on ``target_modules`` of ``base``."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)  # init_lora_weights=False draws A and B from torch's RNG
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(directory)
    return directory
