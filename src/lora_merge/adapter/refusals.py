"""Every combination of adapter features lora-merge refuses, and why, in one place.

Each refusal names the adapter, key or module involved, the reason it cannot be
done exactly, and what to do instead. Conflicts between options (``--unmerge``
with several adapters, ``--save-method lora`` with ``--dtype``...) are usage
errors refused in :mod:`lora_merge.options`; this module holds what the
adapters' contents make impossible. All of it is :class:`InvalidInputError` (exit 4).

An adapter is DoRA when its config says ``use_dora`` or its file holds DoRA's
magnitude vectors (``LoraModuleKeys.magnitude_key``, recognised by the key
table in :mod:`lora_merge.adapter.keys`): another tool may write either alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.initialisation import (
    MODE_OPTIONS,
    InitialStateMode,
    base_changing_initialisation,
)
from lora_merge.adapter.keys import AdapterContents
from lora_merge.errors import InvalidInputError


def _magnitude_key(contents: AdapterContents) -> str | None:
    """The first DoRA magnitude vector's key, or None when the file holds none."""
    return next((m.magnitude_key for m in contents.lora_modules.values() if m.magnitude_key), None)


# --combine: several adapters summed into one.


def refuse_dora_in_combination(
    label: str, config: LoraAdapterConfig, contents: AdapterContents
) -> None:
    """DoRA rescales each output column by a norm of the *merged* weight, which a sum of
    adapters does not have; PEFT's add_weighted_adapter ignores the magnitudes. Refuse.

    Raises:
        InvalidInputError: the adapter is a DoRA adapter.
    """
    dora_key = _magnitude_key(contents)
    if config.use_dora or dora_key is not None:
        evidence = f"key {dora_key!r}" if dora_key else "use_dora in its adapter_config.json"
        raise InvalidInputError(
            f"adapter {label} is a DoRA adapter ({evidence}); "
            "DoRA adapters cannot be combined with others (their magnitude vectors apply to "
            "one adapter's merged weight): merge it on its own first, then combine the others "
            "into that output"
        )


def refuse_tuner_in_combination(label: str, config: LoraAdapterConfig) -> None:
    """--combine sums or concatenates LoRA factors; IA3 multiplies and LoHa/LoKr have no B @ A
    to concatenate, and PEFT's add_weighted_adapter refuses them too. Refuse.

    Raises:
        InvalidInputError: the adapter is not LoRA.
    """
    if config.peft_type != "LORA":
        raise InvalidInputError(
            f"adapter {label} is a {config.peft_type} adapter; --combine combines LoRA adapters "
            "only (an IA3, LoHa or LoKr update is not a B @ A, and AdaLoRA divides by its own rank): merge "
            "it on its own first, then merge the next adapter into that output"
        )


def refuse_trainable_tokens_in_combination(label: str, contents: AdapterContents) -> None:
    """Trainable tokens replace rows outright, so two adapters' rows cannot be summed. Refuse.

    Raises:
        InvalidInputError: the adapter has trainable tokens.
    """
    if contents.trainable_tokens:
        key = next(iter(contents.trainable_tokens.values()))
        raise InvalidInputError(
            f"adapter {label} has trainable tokens (key {key!r}); they replace embedding rows "
            "and cannot be combined with other adapters: merge it on its own first, then "
            "combine the others into that output"
        )


def refuse_lora_bias_in_combination(label: str, contents: AdapterContents) -> None:
    """A combination mixes A and B only; PEFT's add_weighted_adapter drops biases. Refuse.

    Raises:
        InvalidInputError: the adapter has a ``lora_B.bias`` (PEFT ``lora_bias=True``).
    """
    bias_key = next((m.bias_key for m in contents.lora_modules.values() if m.bias_key), None)
    if bias_key is not None:
        raise InvalidInputError(
            f"adapter {label} has a LoRA bias ({bias_key!r}); "
            "adapters with lora_bias=True cannot be combined (PEFT's "
            "add_weighted_adapter does not combine biases either)"
        )


def refuse_combined_experts(expert_a_keys: Iterable[str]) -> None:
    """A combination concatenates or mixes A and B; expert LoRAs interleave experts in them.

    Which LoRAs are on MoE experts only the plan knows (it depends on the base's
    tensors), so the caller passes their A keys.

    Raises:
        InvalidInputError: the combined adapters hold LoRAs on MoE expert parameters.
    """
    a_key = next(iter(expert_a_keys), None)
    if a_key is not None:
        raise InvalidInputError(
            f"adapter key {a_key!r} is a LoRA on MoE expert parameters "
            "(target_parameters), which --combine cannot combine (its A and B hold every "
            "expert, interleaved); merge the adapters one after the other instead"
        )


# --unmerge: subtracting scale * B @ A from a merged model (what loralib's train() does
# to a merged layer) inverts a plain LoRA merge up to rounding, and nothing else.


def refuse_unmerge_of_dora(
    config_path: Path | None, config: LoraAdapterConfig, contents: AdapterContents
) -> None:
    """PEFT's DoRA merge multiplies ``W + scale * B @ A`` by ``m / ||W + scale * B @ A||``,
    a norm of the *original* W, which a merged model no longer holds; dividing by the
    norm of the merged weight would give another model. Refuse.

    Args:
        config_path: the adapter_config.json, or None for a config-less (loralib) file.
        config: the adapter's config.
        contents: the adapter file's keys, sorted by role.

    Raises:
        InvalidInputError: the adapter is DoRA, so the merge cannot be undone exactly.
    """
    magnitude_key = _magnitude_key(contents)
    if config.use_dora or magnitude_key is not None:
        where = f"{config_path} has use_dora=true" if config.use_dora else f"key {magnitude_key!r}"
        raise InvalidInputError(
            f"--unmerge cannot undo a DoRA adapter ({where}): DoRA rescales each weight by the "
            "norm of the original weight, which the merged model no longer holds; keep the "
            "base model and merge again instead"
        )


def refuse_unmerge_of_replacements(contents: AdapterContents) -> None:
    """``--unmerge`` can only subtract deltas: refuse what replaced values in the merge.

    Raises:
        InvalidInputError: the adapter replaces whole tensors or token rows, whose
            former values it does not hold.
    """
    if contents.replacements:
        target, key = next(iter(contents.replacements.items()))
        raise InvalidInputError(
            f"--unmerge cannot restore {target!r}: the adapter replaces it wholesale with "
            f"{key!r} (modules_to_save, a saved embedding or trained biases) and does not hold "
            "the values it replaced; keep the base model and merge again instead"
        )
    if contents.trainable_tokens:
        module, key = next(iter(contents.trainable_tokens.items()))
        raise InvalidInputError(
            f"--unmerge cannot restore the rows of {module!r} that trainable tokens ({key!r}) "
            "replaced: the adapter does not hold their former values; keep the base model and "
            "merge again instead"
        )


# loralib (microsoft/LoRA) checkpoints.


def refuse_loralib_conv(contents: AdapterContents, base_has: Callable[[str], object]) -> None:
    """loralib's ConvLoRA keeps its weight at ``X.conv.weight``: name it rather than "no match".

    Args:
        contents: the checkpoint's keys, sorted by role.
        base_has: truthy when the base holds a tensor of that name (the planner's name lookup).

    Raises:
        InvalidInputError: a LoRA pair belongs to a loralib ConvLoRA.
    """
    for module in contents.lora_modules.values():
        if base_has(f"{module.module}.conv.weight"):
            raise InvalidInputError(
                f"adapter key {module.a_key!r} is a loralib ConvLoRA (its weight is "
                f"{module.module}.conv.weight), which lora-merge does not support"
            )


# Initialisations that changed the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ):
# see lora_merge.adapter.initialisation.


def refuse_unconverted_initialisation(
    config_path: Path | None, config: LoraAdapterConfig, mode: InitialStateMode
) -> None:
    """An adapter trained against other weights than BASE's is merged only as the user says.

    Args:
        config_path: the adapter_config.json, or None for a config-less (loralib) file.
        config: the adapter's config.
        mode: what the user said (``--initial-adapter``, ``--residual-base``,
            ``--recompute-initial``, or nothing).

    Raises:
        InvalidInputError: a plain merge of such an adapter (it would count the initial
            state twice), or an option that does not apply to this adapter.
    """
    initialisation = base_changing_initialisation(config)
    where = config_path or "the adapter"
    if initialisation is None:
        if mode is InitialStateMode.RESIDUAL_BASE or mode is InitialStateMode.RECOMPUTE:
            option = MODE_OPTIONS[mode]
            raise InvalidInputError(
                f"{option} applies to adapters whose initialisation changed the base weights "
                f"(PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), but {where} has init_lora_weights="
                f"{_json_value(config.init_lora_weights)}: merge it without {option}"
            )
        return
    name, value = initialisation.name, initialisation.value
    if mode is InitialStateMode.AS_TRAINED:
        remedies = (
            "convert it with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), pass the adapter as initialised "
            "with --initial-adapter DIR"
        )
        if initialisation.recomputable:
            remedies += ", recompute that initial state from BASE with --recompute-initial"
        remedies += ", or pass a BASE that already is the residual model with --residual-base"
        if not initialisation.subtractable:
            remedies = "pass that backbone as BASE with --residual-base"
        raise InvalidInputError(
            f"{where} says init_lora_weights={value!r}: this {name} adapter was trained "
            f"against {initialisation.trained_against}, not BASE's original weights, so "
            f"merging it as it is would count its initial state twice; {remedies}"
        )
    if not initialisation.subtractable and mode is not InitialStateMode.RESIDUAL_BASE:
        raise InvalidInputError(
            f"{MODE_OPTIONS[mode]} cannot undo {name} ({where}): LoftQ's Q + "
            "scale * B0 @ A0 "
            "only approximates W, so subtracting B0 @ A0 from W is not the trained model; "
            "pass the backbone LoftQ saved as BASE with --residual-base"
        )
    if mode is InitialStateMode.RECOMPUTE and initialisation.not_recomputable:
        raise InvalidInputError(
            f"--recompute-initial cannot recompute the initial state of this {name} adapter "
            f"(init_lora_weights={value!r} in {where}): {initialisation.not_recomputable}; "
            "pass it with --initial-adapter DIR or use --residual-base"
        )


def _json_value(value: object) -> str:
    """A config value as adapter_config.json writes it (``true``, ``"gaussian"``)."""
    return json.dumps(value)
