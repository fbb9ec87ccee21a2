"""The adapter a merge applies: the one given, or the combination of all of them."""

from __future__ import annotations

from lora_merge.adapter.combined import AdapterInput, CombinedAdapter
from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents, as_adalora_modules, classify_adapter_keys
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.adapter.refusals import (
    refuse_dora_in_combination,
    refuse_trainable_tokens_in_combination,
    refuse_tuner_in_combination,
)
from lora_merge.inputs.resolve import AdapterFolder
from lora_merge.io.reader import TensorSource


def adapter_to_merge(
    folders: list[AdapterFolder],
    configs: list[LoraAdapterConfig],
    sources: list[TensorSource],
    recipe: CombineRecipe | None,
) -> tuple[LoraAdapterConfig, AdapterContents, TensorSource]:
    """The adapter the plan merges: the one given, or the combination of all of them.

    Args:
        folders: every adapter, in the order given.
        configs: their configs, in the same order.
        sources: their opened weights, in the same order.
        recipe: how they are combined; None for one adapter merged as it is.

    Returns:
        The config, the classified keys and the tensors of the adapter to merge.

    Raises:
        InvalidInputError: an adapter that cannot be combined (another tuner type than
            LoRA, DoRA, trainable tokens).
    """
    if recipe is None:
        contents = classify_adapter_keys(list(sources[0].keys()))
        if configs[0].peft_type == "ADALORA":  # its A and B are not a LoRA pair
            contents = as_adalora_modules(contents)
        return configs[0], contents, sources[0]
    combined = _combined_adapter(folders, configs, sources, recipe)
    return combined.config, combined.contents, combined


def _combined_adapter(
    folders: list[AdapterFolder],
    configs: list[LoraAdapterConfig],
    sources: list[TensorSource],
    recipe: CombineRecipe,
) -> CombinedAdapter:
    inputs = []
    for folder, config, source in zip(folders, configs, sources, strict=True):
        contents = classify_adapter_keys(list(source.keys()))
        refuse_tuner_in_combination(str(folder.folder), config)
        refuse_dora_in_combination(str(folder.folder), config, contents)
        refuse_trainable_tokens_in_combination(str(folder.folder), contents)
        inputs.append(AdapterInput(str(folder.folder), config, contents, source))
    return CombinedAdapter(inputs, recipe)
