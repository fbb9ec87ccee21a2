"""The run, first step: every decision that comes before writing, shared by merge and preview.

:func:`prepare` runs the first half of the flow on the checked options
(:class:`~lora_merge.options.MergeSettings`): resolve inputs (``inputs/``) -> read the adapter
(``adapter/``) -> plan (``plan/``). :mod:`lora_merge.run.folder` streams the
plan into OUT; :mod:`lora_merge.run.preview` describes it instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_merge.adapter.combined import AdapterInput, CombinedAdapter
from lora_merge.adapter.config import LoraAdapterConfig, read_adapter_config
from lora_merge.adapter.keys import AdapterContents, classify_adapter_keys
from lora_merge.adapter.loralib import LoralibSettings
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.adapter.refusals import (
    refuse_combined_experts,
    refuse_dora_in_combination,
    refuse_trainable_tokens_in_combination,
    refuse_unmerge_of_dora,
)
from lora_merge.adapter.weights import open_adapter_weights
from lora_merge.compute.bitsandbytes_backend import require_bitsandbytes
from lora_merge.errors import LoraMergeWarning
from lora_merge.finish.provenance import MergeRecord, merge_record
from lora_merge.inputs.identity import base_mismatch_warnings
from lora_merge.inputs.merge_inputs import resolve_merge_inputs
from lora_merge.inputs.quantized import merged_output_dtype
from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.options import MergeSettings, SaveMethod
from lora_merge.plan.model import MergePlan
from lora_merge.plan.planner import build_merge_plan
from lora_merge.plan.requantize import plan_requantization
from lora_merge.stream.executor import tile_budget_for

# The share of --max-memory the stream's tiles may use (see tile_budget_for);
# the rest covers the adapter matrices and torch's own allocations.
TILE_SHARE_OF_BUDGET = 0.5


@dataclass
class Prepared:
    """What :func:`prepare` decided.

    Attributes:
        settings: the checked options; ``output_dtype`` set for a quantized base.
        base: the resolved base.
        adapter_folder: the first adapter (``adapter_folders[0]``).
        adapter: the adapter tensors the plan reads (a combination's, when combining).
        out: OUT, absolute and checked.
        config: the adapter config the plan used.
        plan: every output tensor and where it comes from.
        warnings: what the run warned about.
        record: what OUT's model card and shard metadata will say.
        recipe: how several adapters are combined, or None.
        adapter_folders: every adapter, in the order given.
        tile_budget: workspace bytes per tile of the stream (:func:`tile_budget_for`).
    """

    settings: MergeSettings
    base: BaseCheckpoint
    adapter_folder: AdapterFolder
    adapter: TensorSource
    out: Path
    config: LoraAdapterConfig
    plan: MergePlan
    warnings: list[str]
    record: MergeRecord
    recipe: CombineRecipe | None = None
    adapter_folders: list[AdapterFolder] = field(default_factory=list)
    tile_budget: int = 0


@contextmanager
def prepare(options: MergeSettings) -> Iterator[Prepared]:
    """The run, first step: every decision that comes before writing, shared by merge and preview.

    ``options`` come from :func:`~lora_merge.options.checked_options`.

    Raises:
        InvalidInputError: ``merged_4bit`` without a bitsandbytes that loads, and
            every problem with the inputs.
    """
    if options.save_method is SaveMethod.MERGED_4BIT:
        # Found here, before any input is read, not at the first weight to re-quantize.
        require_bitsandbytes("--save-method merged_4bit")
    settings = options
    recipe = options.recipe
    loralib = options.loralib
    base, adapter_folders, out = resolve_merge_inputs(
        options.base,
        options.adapters,
        options.out,
        loralib_file=loralib is not None,
        overwrite=options.overwrite,
        quiet=options.quiet,
        ranged_base=options.low_disk,
    )
    adapter_folder = adapter_folders[0]
    if base.quantization is not None and settings.output_dtype is None:
        # A quantized base has no dtype of its own to keep: default to the dtype
        # the model computed in (bnb_4bit_compute_dtype, or config.json's dtype for 8-bit).
        settings = replace(
            settings, output_dtype=merged_output_dtype(base.quantization, base.config)
        )
    configs = [
        read_adapter_config(folder.config_path)
        if folder.config_path is not None
        else _loralib_config(loralib)
        for folder in adapter_folders
    ]
    # --unmerge reads a merged model, never the base the adapter names
    adapter_bases = [] if options.unmerge else [c.base_model_name_or_path for c in configs]
    notes = base_mismatch_warnings(adapter_bases, str(options.base), base.folder, base.config)
    with ExitStack() as opened:
        sources = [
            opened.enter_context(closing(open_adapter_weights(folder.weights_path)))
            for folder in adapter_folders
        ]
        config, contents, adapter = _read_adapters(adapter_folders, configs, sources, recipe)
        if options.unmerge:
            refuse_unmerge_of_dora(adapter_folder.config_path, config, contents)
        plan = _plan(settings, base, config, contents, adapter, loralib, recipe)
        for note in notes:
            warnings.warn(note, LoraMergeWarning, stacklevel=2)
        record = merge_record(
            str(options.base),
            base,
            [(str(spec), f) for spec, f in zip(options.adapters, adapter_folders, strict=True)],
            plan,
            adapter_base=config.base_model_name_or_path,
            mismatch=bool(notes),
            unmerge=options.unmerge,
            recipe=recipe,
            save_method=settings.save_method,
            output_dtype=settings.output_dtype,
            command=options.command,
        )
        yield Prepared(
            settings,
            base,
            adapter_folder,
            adapter,
            out,
            config,
            plan,
            notes,
            record,
            recipe,
            adapter_folders,
            tile_budget_for(settings.device, int(settings.max_memory * TILE_SHARE_OF_BUDGET)),
        )


def _read_adapters(
    folders: list[AdapterFolder],
    configs: list[LoraAdapterConfig],
    sources: list[TensorSource],
    recipe: CombineRecipe | None,
) -> tuple[LoraAdapterConfig, AdapterContents, TensorSource]:
    """The adapter the plan merges: the one given, or the combination of all of them."""
    if recipe is None:
        return configs[0], classify_adapter_keys(list(sources[0].keys())), sources[0]
    combined = _combined_adapter(folders, configs, sources, recipe)
    return combined.config, combined.contents, combined


def _plan(
    settings: MergeSettings,
    base: BaseCheckpoint,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
    loralib: LoralibSettings | None,
    recipe: CombineRecipe | None,
) -> MergePlan:
    """Every output tensor and where it comes from, re-quantized for ``merged_4bit``."""
    plan = build_merge_plan(
        base,
        config,
        contents,
        adapter,
        settings.output_dtype,
        unmerge=settings.unmerge,
        loralib=loralib,
    )
    if recipe is not None:
        refuse_combined_experts(p.a_key for p in plan.lora_products if p.experts > 1)
    if settings.save_method is SaveMethod.MERGED_4BIT:
        plan = plan_requantization(
            plan, base, settings.quant_type, settings.double_quant, settings.quant_blocksize
        )
    return plan


def _loralib_config(loralib: LoralibSettings | None) -> LoraAdapterConfig:
    """The config a loralib checkpoint (no adapter_config.json) is merged with."""
    assert loralib is not None, "a config-less adapter is resolved only with --rank/--alpha"
    return loralib.adapter_config()


def _combined_adapter(
    folders: list[AdapterFolder],
    configs: list[LoraAdapterConfig],
    sources: list[TensorSource],
    recipe: CombineRecipe,
) -> CombinedAdapter:
    inputs = []
    for folder, config, source in zip(folders, configs, sources, strict=True):
        contents = classify_adapter_keys(list(source.keys()))
        refuse_dora_in_combination(str(folder.folder), config, contents)
        refuse_trainable_tokens_in_combination(str(folder.folder), contents)
        inputs.append(AdapterInput(str(folder.folder), config, contents, source))
    return CombinedAdapter(inputs, recipe)
