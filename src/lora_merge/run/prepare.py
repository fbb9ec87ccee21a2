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

from lora_merge.adapter.config import LoraAdapterConfig, read_adapter_config
from lora_merge.adapter.loralib import loralib_adapter_config
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.adapter.refusals import (
    refuse_unmerge_of_dora,
)
from lora_merge.adapter.to_merge import adapter_to_merge
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
from lora_merge.plan.planner import plan_merge
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
        else loralib_adapter_config(loralib)
        for folder in adapter_folders
    ]
    with ExitStack() as opened:
        sources = [
            opened.enter_context(closing(open_adapter_weights(folder.weights_path)))
            for folder in adapter_folders
        ]
        config, contents, adapter = adapter_to_merge(adapter_folders, configs, sources, recipe)
        if options.unmerge:
            refuse_unmerge_of_dora(adapter_folder.config_path, config, contents)
        plan = plan_merge(base, config, contents, adapter, settings, loralib, recipe is not None)
        # --unmerge reads a merged model, never the base the adapter names
        adapter_bases = [] if options.unmerge else [c.base_model_name_or_path for c in configs]
        notes = base_mismatch_warnings(adapter_bases, str(options.base), base.folder, base.config)
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
