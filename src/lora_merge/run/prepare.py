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
from lora_merge.adapter.initial_state import (
    AdapterMinusInitial,
    InitialDifferenceConfig,
    InitialState,
    SavedInitialState,
    check_initial_adapter_config,
    check_same_modules,
)
from lora_merge.adapter.initialisation import (
    InitialStateMode,
    describe_initial_state,
    is_unknown_initialisation,
)
from lora_merge.adapter.keys import AdapterContents, classify_adapter_keys
from lora_merge.adapter.loralib import LoralibSettings, loralib_adapter_config
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.adapter.recomputed_initial import RecomputedInitialState, RecomputeTarget
from lora_merge.adapter.refusals import (
    refuse_combined_experts,
    refuse_unconverted_initialisation,
    refuse_unmerge_of_dora,
)
from lora_merge.adapter.to_merge import adapter_to_merge
from lora_merge.adapter.weights import open_adapter_weights
from lora_merge.compute.bitsandbytes_backend import require_bitsandbytes
from lora_merge.errors import InvalidInputError, LoraMergeWarning
from lora_merge.finish.provenance import MergeRecord, merge_record
from lora_merge.inputs.identity import base_mismatch_warnings
from lora_merge.inputs.merge_inputs import local_or_hub_folder, resolve_merge_inputs
from lora_merge.inputs.resolve import (
    AdapterFolder,
    BaseCheckpoint,
    check_output_location,
    resolve_adapter,
)
from lora_merge.inputs.training_format import recorded_4bit_format, training_format
from lora_merge.io.http_reader import RangedTensorReader
from lora_merge.io.reader import SafetensorsReader, TensorSource
from lora_merge.options import MergeSettings, SaveMethod
from lora_merge.plan.model import LoraProduct, MergePlan
from lora_merge.plan.planner import build_merge_plan
from lora_merge.plan.requantize import plan_native, plan_requantization, plan_training_quantization
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
        # A bitsandbytes base defaults to the dtype the model computed in
        # (bnb_4bit_compute_dtype, or config.json's dtype); the other formats to each
        # tensor's own, a quantized weight's being the dtype it dequantizes to.
        settings = replace(settings, output_dtype=base.quantization.output_dtype(base.config))
    configs = [
        read_adapter_config(folder.config_path)
        if folder.config_path is not None
        else loralib_adapter_config(loralib)
        for folder in adapter_folders
    ]
    notes = _check_configs_against_base(options, base, adapter_folders, configs)
    with ExitStack() as opened:
        sources = [
            opened.enter_context(closing(open_adapter_weights(folder.weights_path)))
            for folder in adapter_folders
        ]
        config, contents, adapter = adapter_to_merge(adapter_folders, configs, sources, recipe)
        config, adapter, recomputed = _minus_initial_state(
            options, base, adapter_folder, config, contents, adapter, opened
        )
        if options.unmerge:
            refuse_unmerge_of_dora(adapter_folder.config_path, config, contents)
        plan = _plan(settings, base, config, contents, adapter, loralib, recipe, recomputed)
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
            initial_state=describe_initial_state(options.initial_state, configs[0]),
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


def _plan(
    settings: MergeSettings,
    base: BaseCheckpoint,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
    loralib: LoralibSettings | None,
    recipe: CombineRecipe | None,
    recomputed: RecomputedInitialState | None = None,
) -> MergePlan:
    """Every output tensor and where it comes from, re-quantized for ``merged_4bit`` and
    ``merged_native``, read as QLoRA saw it for ``--qlora-base``; ``--recompute-initial``
    learns its weights."""
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
    _recompute_targets(recomputed, plan, adapter, settings.unmerge)
    if settings.qlora_base:
        recorded = recorded_4bit_format(base.config, base.folder, config.base_model_name_or_path)
        quant_type, double_quant = training_format(
            settings.quant_type.value, settings.double_quant, recorded
        )
        plan = plan_training_quantization(
            plan, base, quant_type, double_quant, settings.quant_blocksize
        )
    if settings.save_method is SaveMethod.MERGED_4BIT:
        plan = plan_requantization(
            plan, base, settings.quant_type, settings.double_quant, settings.quant_blocksize
        )
    elif settings.save_method is SaveMethod.MERGED_NATIVE:
        plan = plan_native(plan, base)
    return plan


def _check_configs_against_base(
    options: MergeSettings,
    base: BaseCheckpoint,
    folders: list[AdapterFolder],
    configs: list[LoraAdapterConfig],
) -> list[str]:
    """Notes on the adapters' configs against BASE: another base named, an unknown
    initialisation; refusals of what a base-changing initialisation makes wrong.

    Raises:
        InvalidInputError: see :func:`~lora_merge.adapter.refusals.refuse_unconverted_initialisation`.
    """
    mode = options.initial_state
    # --unmerge reads a merged model, never the base the adapter names; --residual-base
    # a residual (or LoftQ) model made from it, under another name.
    elsewhere = options.unmerge or mode is InitialStateMode.RESIDUAL_BASE
    adapter_bases = [] if elsewhere else [c.base_model_name_or_path for c in configs]
    notes = base_mismatch_warnings(adapter_bases, str(options.base), base.folder, base.config)
    if options.save_method is SaveMethod.LORA:  # writing the adapter as it is merges nothing
        return notes
    for folder, config in zip(folders, configs, strict=True):
        refuse_unconverted_initialisation(folder.config_path, config, mode)
        if is_unknown_initialisation(config):
            notes.append(
                f"{folder.config_path} has init_lora_weights={config.init_lora_weights!r}, "
                "an initialisation lora-merge does not know: it is merged as if it left "
                "the base weights untouched"
            )
    return notes


def _minus_initial_state(
    options: MergeSettings,
    base: BaseCheckpoint,
    adapter_folder: AdapterFolder,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
    opened: ExitStack,
) -> tuple[LoraAdapterConfig, TensorSource, RecomputedInitialState | None]:
    """The adapter with its initial state subtracted (``--initial-adapter``,
    ``--recompute-initial``), or as it is; and the recomputation, whose targets the
    plan will tell (:func:`_recompute_targets`).

    Raises:
        InvalidInputError: DIR is not this adapter's initial state (other ranks, alpha
            or initialisation), or a quantized BASE to recompute from.
        AdapterMismatchError: DIR targets other modules.
    """
    initial: InitialState
    if options.initial_state is InitialStateMode.INITIAL_ADAPTER:
        initial = _saved_initial_state(options, adapter_folder, config, contents, opened)
        recomputed = None
    elif options.initial_state is InitialStateMode.RECOMPUTE:
        if base.quantization is not None:
            raise InvalidInputError(
                f"--recompute-initial decomposes BASE's weights as PEFT did at "
                f"initialisation, but BASE is {base.quantization.describe()}: PiSSA and "
                "OLoRA start from the 16-bit weights; pass the 16-bit BASE, or the adapter "
                "as initialised with --initial-adapter DIR"
            )
        reader: TensorSource = (
            RangedTensorReader(base.entries, base.remote)
            if base.remote
            else SafetensorsReader(base.entries)
        )
        opened.enter_context(closing(reader))
        recomputed = RecomputedInitialState(str(config.init_lora_weights), reader)
        initial = recomputed
    else:
        return config, adapter, None
    minus = AdapterMinusInitial(adapter, contents, initial)
    return InitialDifferenceConfig.of(config), minus, recomputed


def _recompute_targets(
    recomputed: RecomputedInitialState | None, plan: MergePlan, adapter: TensorSource, unmerge: bool
) -> None:
    """Tell the recomputation (if ``--recompute-initial``) which base weight, rank and
    scale each module has.

    Raises:
        InvalidInputError: a layer kind PiSSA and OLoRA do not initialise.
    """
    if recomputed is None:
        return
    for tensor in plan.tensors:
        product = tensor.delta
        if not isinstance(product, LoraProduct):
            continue
        if product.kind not in ("linear", "conv1d"):
            raise InvalidInputError(
                f"--recompute-initial recomputes PiSSA and OLoRA on Linear layers, but "
                f"{product.a_key!r} is on a {product.kind} layer; pass the adapter as "
                "initialised with --initial-adapter DIR"
            )
        rank = adapter.shape(product.a_key)[0] // 2  # [A; A0]: twice the trained rank
        scale = -product.scale if unmerge else product.scale  # --unmerge negated it
        target = RecomputeTarget(tensor.source_key, rank, scale, product.transposed)
        recomputed.add_target(product.a_key, product.b_key, target)


def _saved_initial_state(
    options: MergeSettings,
    adapter_folder: AdapterFolder,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    opened: ExitStack,
) -> SavedInitialState:
    """The initial state of ``--initial-adapter DIR``, checked against the adapter."""
    assert options.initial_adapter is not None
    folder = resolve_adapter(
        local_or_hub_folder(
            options.initial_adapter, "--initial-adapter", kind="adapter", quiet=options.quiet
        )
    )
    assert folder.config_path is not None, "resolve_adapter finds an adapter_config.json"
    # Like every input, DIR may neither hold OUT nor lie inside it (--overwrite deletes OUT).
    check_output_location(options.out, [folder.folder], options.overwrite)
    initial_config = read_adapter_config(folder.config_path)
    check_initial_adapter_config(
        adapter_folder.config_path, config, folder.config_path, initial_config
    )
    source = opened.enter_context(closing(open_adapter_weights(folder.weights_path)))
    check_same_modules(str(folder.folder), contents, classify_adapter_keys(list(source.keys())))
    return SavedInitialState(str(folder.folder), source)
