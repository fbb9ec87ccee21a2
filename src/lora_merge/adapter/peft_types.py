"""PEFT's adapter types (``peft_type`` in adapter_config.json): which ones lora-merge merges.

Three sets, and the message for each (all :class:`InvalidInputError`, exit 4):

- merged: LoRA, and the types whose update PEFT's ``merge`` writes into the
  weights and lora-merge reproduces (:mod:`lora_merge.plan.tuners`): AdaLoRA, IA3, LoHa, LoKr, OFT, VeRA;
- cannot be merged: the types that add virtual tokens or route between adapters
  at run time (prompt tuning, prefix tuning, P-tuning, Poly, X-LoRA...): there is
  no weight update to merge, so no tool can merge them, and we say so;
- the rest: PEFT can merge them but lora-merge does not reproduce them (yet).
"""

from __future__ import annotations

from pathlib import Path

from lora_merge.errors import InvalidInputError

# peft_type -> (name for messages, config field holding alpha, or None when the type has none).
MERGED_TYPES: dict[str, tuple[str, str | None]] = {
    "LORA": ("LoRA", "lora_alpha"),
    "ADALORA": ("AdaLoRA", "lora_alpha"),
    "IA3": ("IA3", None),
    "LOHA": ("LoHa", "alpha"),
    "LOKR": ("LoKr", "alpha"),
    "OFT": ("OFT", None),
    "VERA": ("VeRA", None),
}

# Types whose trained state is not a change of the model's weights (PEFT's
# ``PeftModel.merge_and_unload`` refuses them: they are not ``BaseTuner``s, or, for
# Poly and X-LoRA, pick among adapters per input).
_NOT_WEIGHT_UPDATES = {
    "PROMPT_TUNING": "prompt tuning (learned virtual tokens prepended to the input)",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning (learned virtual tokens)",
    "PREFIX_TUNING": "prefix tuning (learned key/value prefixes in every attention layer)",
    "P_TUNING": "P-tuning (virtual tokens from a prompt encoder)",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter's gated prompt layers)",
    "CPT": "context-aware prompt tuning (learned virtual tokens)",
    "POLY": "Poly (a router that mixes LoRA skills per task at run time)",
    "XLORA": "X-LoRA (a classifier that mixes LoRA experts per token at run time)",
}

# PEFT types lora-merge knows by name but does not merge; named in the refusal.
_OTHER_NAMES = {
    "BOFT": "BOFT",
    "HRA": "HRA",
    "FOURIERFT": "FourierFT",
    "VBLORA": "VB-LoRA",
    "LN_TUNING": "LayerNorm tuning",
}


def check_peft_type(path: Path, peft_type: object) -> str:
    """The ``peft_type`` of a config lora-merge can merge, checked.

    Raises:
        InvalidInputError: the type has no weight update to merge, or lora-merge does
            not merge it.
    """
    if isinstance(peft_type, str) and peft_type in MERGED_TYPES:
        return peft_type
    if isinstance(peft_type, str) and peft_type in _NOT_WEIGHT_UPDATES:
        raise InvalidInputError(
            f"{path} describes a {_NOT_WEIGHT_UPDATES[peft_type]} adapter (peft_type "
            f"{peft_type!r}): this type cannot be merged into weights, as it changes no weight "
            "of the model; load it with PEFT on top of the base model instead"
        )
    name = _OTHER_NAMES.get(str(peft_type), repr(peft_type))
    merged = ", ".join(name for name, _ in MERGED_TYPES.values())
    raise InvalidInputError(
        f"{path} describes a {name} adapter (peft_type {peft_type!r}); lora-merge merges "
        f"{merged} adapters and does not support this type yet (PEFT's merge_and_unload can "
        "merge it with the whole model in memory)"
    )
