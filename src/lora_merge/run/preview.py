"""The run, second step for a preview: what a merge would do, decided without writing anything.

:func:`preview_settings` (``--dry-run``, :func:`lora_merge.api.preview_merge`)
prepares the merge as a merge does (:func:`lora_merge.run.prepare.prepare`),
then only counts and names: inputs, layer kinds, scales, dtypes, the output
shards, memory and disk.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from lora_merge.adapter.peft_types import MERGED_TYPES
from lora_merge.finish.disk import check_free_space, free_space
from lora_merge.finish.shard_sink import disk_needed
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.options import MergeSettings
from lora_merge.plan.shards import shard_layout, shards_of_part
from lora_merge.run.prepare import prepare
from lora_merge.stream.executor import working_memory_bound


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
        threads: CPU threads that would merge at once (``--threads``, or the CPUs the
            process may use).
        disk_free_bytes: free space where OUT goes.
        disk_needed_bytes: the tensor bytes OUT's disk must hold at once: every shard,
            or with ``--low-disk`` the two largest (one uploading, one being written);
            the small files (config, tokenizer, card) come on top.
        adapters / combine: every adapter and the method, when adapters are combined.
        quantization: how BASE is quantized (bitsandbytes), or None.
        save_method: merged_16bit, merged_4bit, merged_native or lora.
        part / part_shards: for ``--part I/N``, the part and the shards it would write.
        adapter_type: PEFT's name of the adapter type (LoRA, AdaLoRA, IA3, LoHa, ...).
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
    disk_needed_bytes: int = 0
    low_disk: bool = False
    part: str | None = None
    part_shards: list[str] | None = None
    adapter_type: str = "LoRA"
    threads: int = 1

    def to_dict(self) -> dict[str, object]:
        preview = asdict(self)
        if self.combine is None:  # a single-adapter plan keeps its documented fields
            del preview["adapters"], preview["combine"]
        if self.part is None:  # only a part's plan has them
            del preview["part"], preview["part_shards"]
        return preview


def preview_settings(options: MergeSettings) -> MergePreview:
    """Resolve the inputs, read headers and the adapter, plan the merge; write nothing.

    Raises:
        LoraMergeError: everything :func:`~lora_merge.api.merge` would refuse before
            writing, including a disk too small for OUT.
    """
    with prepare(options) as prepared:
        plan, settings, config, base = (
            prepared.plan,
            prepared.settings,
            prepared.config,
            prepared.base,
        )
        shards = shard_layout(plan.tensors, settings.max_shard_size)
        shard_bytes = [sum(t.spec.nbytes for t in tensors) for _, tensors in shards]
        needed = disk_needed(shard_bytes, options.low_disk)
        check_free_space(prepared.out, needed)
        part = settings.part
        part_shards = None if part is None else [f for f, _ in shards_of_part(part, shards)]
        return MergePreview(
            base=str(base.folder),
            adapter=str(prepared.adapter_folder.location),
            out=str(prepared.out),
            base_shards=len({e.path for e in base.entries.values()}),
            base_bytes=sum(e.nbytes for e in base.entries.values()),
            rank=config.r,
            alpha=config.lora_alpha,
            rslora=config.use_rslora,
            rank_pattern_keys=len(config.rank_pattern),
            alpha_pattern_keys=len(config.alpha_pattern),
            lora_modules_by_layer=plan.lora_modules_by_layer,
            scales={f"{scale:g}": n for scale, n in plan.module_scales.items()},
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
                prepared.tile_budget,
                settings.threads,
            ),
            disk_free_bytes=free_space(prepared.out),
            adapters=[str(folder.folder) for folder in prepared.adapter_folders],
            combine=prepared.recipe.method_name if prepared.recipe else None,
            quantization=_describe_quantization(base),
            save_method=settings.save_method.value,  # the summary's JSON holds the name
            disk_needed_bytes=needed,
            low_disk=options.low_disk,
            part=None if part is None else str(part),
            part_shards=part_shards,
            adapter_type=MERGED_TYPES[config.peft_type][0],
            threads=settings.threads,
        )


def _describe_quantization(base: BaseCheckpoint) -> str | None:
    """e.g. ``bitsandbytes nf4 (blocksize 64), 22 weights``; None for an unquantized base."""
    if base.quantization is None:
        return None
    return f"{base.quantization.describe()}, {len(base.quantization.weights)} weights"
