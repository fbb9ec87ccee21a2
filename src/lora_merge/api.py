"""The one library function behind the CLI: :func:`merge`.

It runs the flow in order: resolve inputs -> read adapter -> plan -> stream
tensors into shards -> finish the folder (index, config, tokenizer) -> rename
into place. Each step lives in its own package.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from lora_merge._version import __version__
from lora_merge.adapter.combined import AdapterInput, CombinedAdapter
from lora_merge.adapter.config import LoraAdapterConfig, read_adapter_config
from lora_merge.adapter.keys import classify_adapter_keys
from lora_merge.adapter.loralib import LoralibSettings
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.adapter.refusals import (
    refuse_combined_experts,
    refuse_dora_in_combination,
    refuse_trainable_tokens_in_combination,
    refuse_unmerge_of_dora,
)
from lora_merge.adapter.weights import open_adapter_weights
from lora_merge.compute.bitsandbytes_backend import load_bitsandbytes
from lora_merge.compute.lora import UNMERGE_ARITHMETIC, merge_arithmetic
from lora_merge.errors import InvalidInputError, LoraMergeWarning, OutputError
from lora_merge.finish.adapter_output import write_normalized_adapter
from lora_merge.finish.folder import (
    DTYPE_NAME_IN_CONFIG,
    copy_side_files,
    write_config,
    write_index,
)
from lora_merge.finish.provenance import (
    InputIdentity,
    MergeRecord,
    declared_base_model,
    describe_arithmetic,
    files_read_by_merge,
    shard_metadata,
    start_hashing,
    write_model_card,
)
from lora_merge.finish.publish import push_folder
from lora_merge.finish.staging import StagingFolder
from lora_merge.finish.verify import verify_output
from lora_merge.inputs.hub import resolve_model_location
from lora_merge.inputs.identity import base_mismatch_warning
from lora_merge.inputs.quantized import merged_output_dtype
from lora_merge.inputs.resolve import (
    AdapterFolder,
    BaseCheckpoint,
    check_output_location,
    resolve_adapter,
    resolve_adapter_file,
    resolve_base,
)
from lora_merge.io.dequantizing_reader import DequantizingReader
from lora_merge.io.reader import SafetensorsReader, StoredTensorSource, TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.options import MergeOptions, MergeSettings, checked_options
from lora_merge.plan.fingerprint import merge_fingerprint
from lora_merge.plan.planner import MergePlan, PlannedTensor, build_merge_plan
from lora_merge.plan.requantize import plan_requantization, requantized_config
from lora_merge.plan.shards import plan_output_shards, shard_file_names
from lora_merge.stream.executor import tile_budget_for, working_memory_bound, write_shard

# Room left on OUT's disk beyond the shards (config, tokenizer, filesystem slack).
DISK_SPACE_MARGIN_BYTES = 64 * 2**20
# The share of --max-memory the stream's tiles may use (see tile_budget_for);
# the rest covers the adapter matrices and torch's own allocations.
TILE_SHARE_OF_BUDGET = 0.5


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did.

    Attributes:
        out: the folder written.
        tensors: output tensors written.
        lora_modules: LoRA modules merged.
        replaced: base tensors replaced by adapter tensors.
        copied: tensors copied byte for byte.
        shards: safetensors files in OUT.
        resumed_shards: shards kept from an interrupted run (``--resume``).
        bytes_written: tensor data bytes written.
        seconds: wall time of the merge.
        base / adapter: the resolved input folders.
        files: the files written to OUT.
        lora_modules_by_layer: LoRA modules merged, by layer kind.
        plan_seconds / write_seconds: time spent planning, and streaming and finishing OUT.
        warnings: what the run warned about (also issued as ``LoraMergeWarning``).
        pushed_to / commit_url: the Hub repo OUT was uploaded to and the commit, if pushed.
        adapters: every adapter combined (``adapter`` is the first), and
            ``combine`` the method, when several adapters (or combination options) were given.
    """

    out: str
    tensors: int
    lora_modules: int
    replaced: int
    copied: int
    shards: int
    resumed_shards: int
    bytes_written: int
    seconds: float
    base: str = ""
    adapter: str = ""
    files: list[str] = field(default_factory=list)
    lora_modules_by_layer: dict[str, int] = field(default_factory=dict)
    plan_seconds: float = 0.0
    write_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    pushed_to: str | None = None
    commit_url: str | None = None
    adapters: list[str] = field(default_factory=list)
    combine: str | None = None

    def to_dict(self) -> dict[str, object]:
        summary = asdict(self)
        if self.combine is None:  # a single-adapter merge keeps its documented fields
            del summary["adapters"], summary["combine"]
        return summary


@dataclass(frozen=True)
class _RunSettings:
    """MergeOptions parsed and checked once."""

    output_dtype: torch.dtype | None
    max_shard_size: int
    tile_budget: int
    device: torch.device
    show_progress: bool
    resume: bool
    allow_nonfinite: bool
    verify: bool
    hash_inputs: bool
    save_method: str = "merged_16bit"
    quant_type: str = "nf4"
    double_quant: bool = False


def merge(options: MergeOptions) -> MergeSummary:
    """Merge a LoRA adapter into its base model and write a standalone model folder.

    Args:
        options: what to merge, where to, and how.

    Returns:
        A summary of the work done.

    Raises:
        UsageError: options that are invalid or contradict each other, raised
            before anything is read or written.
        LoraMergeError: for every problem with the inputs or OUT; nothing is
            written to OUT in that case and the inputs are never modified.
    """
    settings = checked_options(options)
    try:
        summary = _merge(settings)
    except PermissionError as err:
        # Whatever step met it, a permission problem is the user's to fix: name the path.
        path = Path(err.filename or "?")
        out_parent = Path(settings.out).expanduser().absolute().parent
        error = OutputError if path.is_relative_to(out_parent) else InvalidInputError
        raise error(
            f"cannot access {path}: permission denied; check the file's permissions"
        ) from err
    if settings.push_to_hub is None:
        return summary
    commit_url = push_folder(
        Path(summary.out),
        settings.push_to_hub,
        private=settings.private,
        revision=settings.hub_revision,
        message=f"Upload model merged by lora-merge {__version__}",
        quiet=settings.quiet,
    )
    return replace(summary, pushed_to=settings.push_to_hub, commit_url=commit_url)


@dataclass(frozen=True)
class MergePreview:
    """What a merge would do, decided without writing anything (``--dry-run``).

    Attributes:
        base / adapter / out: the resolved folders.
        base_shards: safetensors files read from BASE.
        base_bytes: tensor bytes in BASE.
        rank / alpha / rslora: the adapter config's defaults.
        rank_pattern_keys / alpha_pattern_keys: pattern counts in the config.
        lora_modules_by_layer: LoRA modules merged, by layer kind.
        scales: distinct scales and how many modules use each.
        replaced: base tensors replaced by adapter tensors.
        copied: tensors copied byte for byte.
        dtypes_in / dtypes_out: tensor counts by dtype, before and after.
        output_shards: output file name -> tensor bytes.
        output_bytes: tensor bytes written.
        vocab_size: the new vocabulary size, when the adapter resizes it.
        working_memory_bytes: an upper bound of the tensor data the stream holds at once
            (tile buffers, and the LoRA factors of as many tensors as there are threads).
        disk_free_bytes: free space where OUT goes.
        adapters / combine: every adapter and the method, when adapters are combined.
        quantization: how BASE is quantized (bitsandbytes), or None.
        save_method: merged_16bit, merged_4bit or lora.
    """

    base: str
    adapter: str
    out: str
    base_shards: int
    base_bytes: int
    rank: int
    alpha: float
    rslora: bool
    rank_pattern_keys: int
    alpha_pattern_keys: int
    lora_modules_by_layer: dict[str, int]
    scales: dict[str, int]
    replaced: int
    copied: int
    dtypes_in: dict[str, int]
    dtypes_out: dict[str, int]
    output_shards: dict[str, int]
    output_bytes: int
    vocab_size: int | None
    working_memory_bytes: int
    disk_free_bytes: int
    adapters: list[str] = field(default_factory=list)
    combine: str | None = None
    quantization: str | None = None
    save_method: str = "merged_16bit"

    def to_dict(self) -> dict[str, object]:
        preview = asdict(self)
        if self.combine is None:  # a single-adapter plan keeps its documented fields
            del preview["adapters"], preview["combine"]
        return preview


def preview_merge(options: MergeOptions) -> MergePreview:
    """Resolve the inputs, read headers and the adapter, plan the merge; write nothing.

    Raises:
        LoraMergeError: everything :func:`merge` would refuse before writing,
            including a disk too small for OUT.
    """
    with _prepare(checked_options(options)) as prepared:
        plan, settings = prepared.plan, prepared.settings
        shards = _shard_layout(plan, settings.max_shard_size)
        _check_free_space(prepared.out, plan.total_bytes)
        return MergePreview(
            base=str(prepared.base.folder),
            adapter=str(_adapter_location(prepared.adapter_folder)),
            out=str(prepared.out),
            base_shards=len({e.path for e in prepared.base.entries.values()}),
            base_bytes=sum(e.nbytes for e in prepared.base.entries.values()),
            rank=prepared.config.r,
            alpha=prepared.config.lora_alpha,
            rslora=prepared.config.use_rslora,
            rank_pattern_keys=len(prepared.config.rank_pattern),
            alpha_pattern_keys=len(prepared.config.alpha_pattern),
            lora_modules_by_layer=plan.lora_modules_by_layer,
            scales={
                f"{scale:g}": n
                for scale, n in Counter(p.scale for p in plan.module_products).items()
            },
            replaced=plan.replaced,
            copied=plan.copied,
            dtypes_in=dict(
                Counter(str(t.source_dtype).removeprefix("torch.") for t in plan.tensors)
            ),
            dtypes_out=dict(
                Counter(str(t.spec.dtype).removeprefix("torch.") for t in plan.tensors)
            ),
            output_shards={f: sum(t.spec.nbytes for t in tensors) for f, tensors in shards},
            output_bytes=plan.total_bytes,
            vocab_size=plan.vocab_size,
            working_memory_bytes=working_memory_bound(
                (tensors for _, tensors in shards),
                prepared.adapter,
                settings.device,
                settings.tile_budget,
            ),
            disk_free_bytes=_free_space(prepared.out),
            adapters=[str(folder.folder) for folder in prepared.adapter_folders],
            combine=prepared.recipe.method_name if prepared.recipe else None,
            quantization=(
                None
                if prepared.base.quantization is None
                else f"{prepared.base.quantization.describe()}, "
                f"{len(prepared.base.quantization.weights)} weights"
            ),
            save_method=settings.save_method,
        )


@dataclass
class _Prepared:
    settings: _RunSettings
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


@contextmanager
def _prepare(options: MergeSettings) -> Iterator[_Prepared]:
    """Every check and decision that comes before writing, shared by merge and preview.

    ``options`` come from :func:`~lora_merge.options.checked_options`.
    """
    settings = _RunSettings(
        output_dtype=options.output_dtype,
        max_shard_size=options.max_shard_size,
        tile_budget=tile_budget_for(options.device, int(options.max_memory * TILE_SHARE_OF_BUDGET)),
        device=options.device,
        show_progress=not options.quiet and sys.stderr.isatty(),
        resume=options.resume,
        allow_nonfinite=options.allow_nonfinite,
        verify=options.verify,
        hash_inputs=options.hash_inputs,
        save_method=options.save_method.value,
        quant_type=options.quant_type.value,
        double_quant=options.double_quant,
    )
    if settings.save_method == "merged_4bit" and load_bitsandbytes() is None:
        # Found here, not at the first weight to re-quantize, once much is written.
        raise InvalidInputError(
            "--save-method merged_4bit re-quantizes with bitsandbytes, which is not installed "
            "or does not load here: pip install bitsandbytes, or use merged_16bit"
        )
    # A local folder wins; otherwise BASE / ADAPTER may be Hub repo ids (org/name[@rev]).
    base = resolve_base(
        resolve_model_location(options.base, "BASE", kind="model", quiet=options.quiet)
    )
    recipe = options.recipe
    loralib = options.loralib
    if loralib is not None:  # a loralib state dict: one local file, no config
        adapter_folders = [resolve_adapter_file(options.adapters[0])]
    else:
        adapter_folders = [
            resolve_adapter(
                resolve_model_location(spec, "ADAPTER", kind="adapter", quiet=options.quiet)
            )
            for spec in options.adapters
        ]
    adapter_folder = adapter_folders[0]
    # A loralib file's folder may hold OUT; only the file itself must stay out of OUT's way.
    adapter_inputs = [_adapter_location(folder) for folder in adapter_folders]
    out = check_output_location(options.out, [base.folder, *adapter_inputs], options.overwrite)
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
    with ExitStack() as opened:
        sources = [
            opened.enter_context(closing(open_adapter_weights(folder.weights_path)))
            for folder in adapter_folders
        ]
        adapter: TensorSource
        if recipe is None:
            config, adapter = configs[0], sources[0]
            contents = classify_adapter_keys(list(adapter.keys()))
            if options.unmerge:
                refuse_unmerge_of_dora(adapter_folder.config_path, config, contents)
        else:
            combined = _combined_adapter(adapter_folders, configs, sources, recipe)
            config, contents, adapter = combined.config, combined.contents, combined
        plan = build_merge_plan(
            base,
            config,
            contents,
            adapter,
            settings.output_dtype,
            unmerge=options.unmerge,
            loralib=loralib,
        )
        if recipe is not None:
            refuse_combined_experts(p.a_key for p in plan.lora_products if p.experts > 1)
        if settings.save_method == "merged_4bit":
            plan = plan_requantization(
                plan, base, settings.quant_type, options.double_quant, options.quant_blocksize
            )
        notes = [
            note
            for note in (
                base_mismatch_warning(
                    adapter_config.base_model_name_or_path,
                    str(options.base),
                    base.folder,
                    base.config,
                )
                # --unmerge reads a merged model, never the base the adapter names
                for adapter_config in (configs if not options.unmerge else [])
            )
            if note
        ]
        for note in notes:
            warnings.warn(note, LoraMergeWarning, stacklevel=2)
        record = _merge_record(
            options, base, adapter_folders, config, plan, settings, notes, recipe
        )
        yield _Prepared(
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
        )


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


def _merge(options: MergeSettings) -> MergeSummary:
    started = time.perf_counter()
    with _prepare(options) as prepared:
        plan = prepared.plan
        planned = time.perf_counter()
        shards, resumed = _write_output(
            plan,
            prepared.base,
            prepared.adapter,
            prepared.adapter_folders,
            prepared.out,
            prepared.settings,
            prepared.record,
            prepared.recipe,
        )
        written = [t.spec for t in plan.tensors]
        if prepared.settings.save_method == "lora":  # the adapter's tensors, not the model's
            adapter = prepared.adapter
            keys = list(adapter.keys())
            written = [TensorSpec(k, adapter.dtype(k), adapter.shape(k)) for k in keys]
    finished = time.perf_counter()
    return MergeSummary(
        out=str(prepared.out),
        tensors=len(written),
        lora_modules=plan.lora_modules,
        replaced=plan.replaced,
        copied=plan.copied,
        shards=shards,
        resumed_shards=resumed,
        bytes_written=sum(spec.nbytes for spec in written),
        seconds=round(finished - started, 3),
        base=str(prepared.base.folder),
        adapter=str(_adapter_location(prepared.adapter_folder)),
        files=sorted(p.name for p in prepared.out.iterdir()),
        lora_modules_by_layer=plan.lora_modules_by_layer,
        plan_seconds=round(planned - started, 3),
        write_seconds=round(finished - planned, 3),
        warnings=prepared.warnings,
        adapters=[str(folder.folder) for folder in prepared.adapter_folders],
        combine=prepared.recipe.method_name if prepared.recipe else None,
    )


def _shard_layout(plan: MergePlan, max_shard_size: int) -> list[tuple[str, list[PlannedTensor]]]:
    """Output file names and the planned tensors of each, in write order."""
    by_name = {t.spec.name: t for t in plan.tensors}
    # A 4-bit weight's scales and quant state go in its shard (they are written with it).
    group: dict[str, list[PlannedTensor]] = {}
    for tensor in plan.tensors:
        group.setdefault(tensor.written_with or tensor.spec.name, []).append(tensor)
    names_per_shard = plan_output_shards(
        [(name, sum(t.spec.nbytes for t in members)) for name, members in group.items()],
        max_shard_size,
    )
    file_names = shard_file_names(len(names_per_shard))
    return [
        (file_name, [member for name in names for member in group[by_name[name].spec.name]])
        for file_name, names in zip(file_names, names_per_shard, strict=True)
    ]


def _write_output(
    plan: MergePlan,
    base: BaseCheckpoint,
    adapter: TensorSource,
    adapter_folders: Sequence[AdapterFolder],
    out: Path,
    settings: _RunSettings,
    record: MergeRecord,
    recipe: CombineRecipe | None = None,
) -> tuple[int, int]:
    """Stream the planned tensors into shards and finish OUT.

    With several adapters, the first one's tokenizer files win and ``recipe``
    says how they were combined.

    Returns:
        The number of shards, and how many of them a resumed run kept.
    """
    adapter_folder = adapter_folders[0]
    shards = _shard_layout(plan, settings.max_shard_size)
    _check_free_space(out, plan.total_bytes)
    fingerprint = None
    if settings.resume:
        inputs = [entry.path for entry in base.entries.values()]
        for folder in adapter_folders:
            inputs += [path for path in (folder.config_path, folder.weights_path) if path]
        fingerprint = merge_fingerprint(
            shards, inputs, __version__, recipe.describe() if recipe else ""
        )
    metadata = shard_metadata(record)
    # --save-method lora writes no model card, so it needs no input hashes.
    hashes = start_hashing(
        files_read_by_merge(base, adapter_folders),
        settings.hash_inputs and settings.save_method != "lora",
    )

    progress = tqdm(
        total=plan.total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        file=sys.stderr,
        disable=not settings.show_progress,
    )
    progress_lock = threading.Lock()

    def on_bytes(count: int) -> None:  # called from the stream's worker threads
        with progress_lock:
            progress.update(count)

    kept = 0
    with (
        StagingFolder(out, fingerprint) as staging,
        _open_base(base, settings.device) as base_reader,
        progress,
    ):
        if settings.save_method == "lora":
            write_normalized_adapter(staging.path, adapter_folder, adapter)
            on_bytes(plan.total_bytes)
            staging.commit()
            return 1, 0
        for file_name, tensors in shards:
            if staging.has_verified_shard(file_name):
                kept += 1
                on_bytes(sum(t.spec.nbytes for t in tensors))
                continue
            write_shard(
                staging.path / file_name,
                tensors,
                base_reader,
                adapter,
                settings.device,
                settings.tile_budget,
                on_bytes,
                settings.allow_nonfinite,
                metadata,
            )
            staging.record_shard(file_name)
        if settings.verify:
            verify_output(staging.path, shards, base.entries, adapter, base_reader)
        if len(shards) > 1:
            write_index(staging.path, [(f, [t.spec for t in tensors]) for f, tensors in shards])
        config = {k: v for k, v in base.config.items() if k != "quantization_config"}
        if settings.save_method == "merged_4bit":
            config["quantization_config"] = requantized_config(
                base, settings.quant_type, settings.double_quant, settings.output_dtype
            )
        elif base.quantization is None:
            config = base.config
        # else: the output holds plain tensors; transformers must not look for quant states.
        write_config(
            staging.path, config, settings.output_dtype, plan.vocab_size, plan.config_updates
        )
        # A loralib file's folder is no model folder: its side files all come from BASE.
        side_files = adapter_folder.folder if adapter_folder.config_path else base.folder
        copy_side_files(staging.path, base.folder, side_files)
        write_model_card(staging.path, record, hashes.result())
        staging.commit()
    return len(shards), kept


def _merge_record(
    options: MergeSettings,
    base: BaseCheckpoint,
    adapter_folders: list[AdapterFolder],
    config: LoraAdapterConfig,
    plan: MergePlan,
    settings: _RunSettings,
    notes: list[str],
    recipe: CombineRecipe | None = None,
) -> MergeRecord:
    """What OUT's model card and shard metadata say about this merge.

    With several adapters the card's adapter is the first; the method line
    names them all and how they were combined.
    """
    base_identity = InputIdentity.of("base", str(options.base), base.folder)
    output_dtype = settings.output_dtype
    method = merge_arithmetic(any(p.magnitude_key for p in plan.lora_products))
    if recipe is not None:
        method += (
            f"; B @ A is the combination of {', '.join(map(str, options.adapters))} by "
            f"--combine {recipe.method_name}, weights "
            f"{','.join(f'{w:g}' for w in recipe.weights)}"
        )
    return MergeRecord(
        base=base_identity,
        adapter=InputIdentity.of("adapter", str(options.adapters[0]), adapter_folders[0].folder),
        declared_base=declared_base_model(
            base_identity, config.base_model_name_or_path, mismatch=bool(notes)
        ),
        method=describe_arithmetic(
            UNMERGE_ARITHMETIC if options.unmerge else method, base, settings.save_method
        ),
        scales={
            f"{scale:g}": n
            for scale, n in sorted(Counter(p.scale for p in plan.module_products).items())
        },
        lora_modules_by_layer=plan.lora_modules_by_layer,
        output_dtype=(
            DTYPE_NAME_IN_CONFIG[output_dtype]
            if output_dtype is not None
            else "as in BASE (--dtype auto)"
        ),
        version=__version__,
        command=options.command,
        other_adapters=tuple(
            InputIdentity.of("adapter", str(spec), folder.folder)
            for spec, folder in zip(options.adapters[1:], adapter_folders[1:], strict=True)
        ),
    )


@contextmanager
def _open_base(base: BaseCheckpoint, device: torch.device) -> Iterator[StoredTensorSource]:
    """The base's reader: quantized weights come out dequantized (on ``device``)."""
    with SafetensorsReader(base.entries) as stored:
        if base.quantization is None:
            yield stored
        else:
            yield DequantizingReader(stored, base.tensors, device)


def _adapter_location(adapter: AdapterFolder) -> Path:
    """What reports call the adapter: its folder, or the file of a config-less (loralib) one."""
    return adapter.folder if adapter.config_path is not None else adapter.weights_path


def _free_space(out: Path) -> int:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def _check_free_space(out: Path, needed: int) -> None:
    free = _free_space(out)
    parent = out.parent
    if free < needed + DISK_SPACE_MARGIN_BYTES:
        raise OutputError(
            f"OUT needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free on the disk "
            f"holding {parent}; free some space or choose another OUT"
        )
