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
