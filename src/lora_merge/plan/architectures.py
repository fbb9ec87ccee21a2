"""Per-architecture facts the tensors alone cannot tell.

transformers' ``Conv1D`` (GPT-2 and its family) stores weights as (in, out), the
transpose of ``nn.Linear``. PEFT sets ``fan_in_fan_out`` per module from the
module's class. We only see shapes: when in != out the stored shape decides;
when the weight is square (GPT-2's attention ``c_proj``) this table does.
"""

from __future__ import annotations

# model_type (config.json) -> leaf module names that are Conv1D in that architecture.
CONV1D_MODULES_BY_MODEL_TYPE: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}

# Names of the input embedding and output head across architectures: the tensors
# whose row count is the vocabulary size.
VOCAB_TENSOR_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_out.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "output.weight",
)


def is_conv1d_module(model_type: str | None, module_name: str) -> bool | None:
    """True/False when the architecture says whether a module is Conv1D; None when unknown."""
    if model_type is None or model_type not in CONV1D_MODULES_BY_MODEL_TYPE:
        return None
    return module_name.rsplit(".", 1)[-1] in CONV1D_MODULES_BY_MODEL_TYPE[model_type]


# model_type -> config.json flag -> leaf module names whose bias that flag switches on.
# A flag gives a bias to every module of its group in every layer, so when an adapter
# adds a bias (PEFT lora_bias=True on a layer without one) to one of them, the others
# get zero biases. Architectures absent here cannot hold a bias they were built without.
# Read from each model's modeling file in transformers 5 (``bias=config.attention_bias``).
_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_MLP = frozenset({"gate_proj", "up_proj", "down_proj"})
BIAS_FLAGS_BY_MODEL_TYPE: dict[str, dict[str, frozenset[str]]] = {
    "llama": {"attention_bias": _ATTENTION, "mlp_bias": _MLP},
    "granite": {"attention_bias": _ATTENTION, "mlp_bias": _MLP},
    "gemma": {"attention_bias": _ATTENTION},
    "gemma2": {"attention_bias": _ATTENTION},
    "gemma3_text": {"attention_bias": _ATTENTION},
    "qwen3": {"attention_bias": _ATTENTION},
    "olmo": {"attention_bias": _ATTENTION},
    "olmo2": {"attention_bias": _ATTENTION},
}


def bias_flag_for(model_type: str | None, module_name: str) -> tuple[str, frozenset[str]] | None:
    """The config flag that gives ``module_name`` a bias, and the leaf names it covers."""
    flags = BIAS_FLAGS_BY_MODEL_TYPE.get(model_type or "", {})
    leaf = module_name.rsplit(".", 1)[-1]
    return next(((flag, leaves) for flag, leaves in flags.items() if leaf in leaves), None)


# Input embeddings an output head can be tied to, and the head's name when the base
# stores none (``tie_word_embeddings``): transformers then reuses the embedding.
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
TIED_HEAD_NAME = "lm_head.weight"
