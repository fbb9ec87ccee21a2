"""What the command prints about a run: the summary line after a merge, and the
``--dry-run`` plan, one aspect per line. Text only; the CLI decides where it goes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only types: importing the library here would import torch for --help
    from lora_merge.api import MergePreview, MergeSummary


def describe_summary(summary: MergeSummary, unmerge: bool = False) -> str:
    """The one line printed on stderr after a merge (or an ``--unmerge``)."""
    resumed = (
        f", {summary.resumed_shards} shard(s) kept from the interrupted run"
        if summary.resumed_shards
        else ""
    )
    pushed = f"; pushed to {summary.commit_url}" if summary.commit_url else ""
    if summary.part is not None:
        return (
            f"part {summary.part}: wrote {summary.computed_shards} shard(s) and kept "
            f"{summary.resumed_shards} ({human_bytes(summary.bytes_written)}) for "
            f"{summary.out} in {summary.seconds:.1f} s; finish OUT with the same command "
            "without --part, with --resume"
        )
    if summary.computed_shards is not None:
        resumed = (
            f", {summary.resumed_shards} shard(s) from the parts, "
            f"{summary.computed_shards} computed here"
        )
    return (
        f"{'unmerged' if unmerge else 'merged'} {summary.lora_modules} LoRA modules into "
        f"{summary.tensors} tensors "
        f"({summary.copied} copied unchanged, {summary.replaced} replaced by the adapter's"
        f"{resumed}), wrote {human_bytes(summary.bytes_written)} in {summary.shards} shard(s) "
        f"to {summary.out} in {summary.seconds:.1f} s{pushed}"
    )


def describe_preview(preview: MergePreview) -> str:
    """The ``--dry-run`` report: a first line saying nothing was written, then one
    aspect of the plan per line, each led by its name."""
    rows = [
        (
            "base",
            f"{preview.base} ({preview.base_shards} file(s), {human_bytes(preview.base_bytes)})",
        ),
        ("adapter", _adapter_line(preview)),
    ]
    if preview.combine:
        adapters = ", ".join(preview.adapters)
        rows.append(
            ("combine", f"{len(preview.adapters)} adapter(s) by {preview.combine}: {adapters}")
        )
    layers = ", ".join(f"{n} {kind}" for kind, n in sorted(preview.lora_modules_by_layer.items()))
    modules = sum(preview.lora_modules_by_layer.values())
    rows.append(("modules", f"{modules} {preview.adapter_type} ({layers or 'none'})"))
    if preview.quantization:
        requantized = preview.save_method in ("merged_4bit", "merged_native")
        then = f", re-quantized ({preview.save_method})" if requantized else ""
        rows.append(("quant", f"{preview.quantization}, dequantized{then}"))
    scales = ", ".join(f"{scale} ({n} modules)" for scale, n in sorted(preview.scales.items()))
    rows.append(("scales", f"{len(preview.scales)} distinct: {scales or 'none'}"))
    rows.append(
        (
            "tensors",
            f"{preview.copied} copied unchanged, {preview.replaced} replaced by the adapter's",
        )
    )
    dtypes_in = ", ".join(f"{n} {dtype}" for dtype, n in sorted(preview.dtypes_in.items()))
    dtypes_out = ", ".join(f"{n} {dtype}" for dtype, n in sorted(preview.dtypes_out.items()))
    rows.append(("dtype", f"{dtypes_in} -> {dtypes_out}"))
    vocab = "unchanged" if preview.vocab_size is None else f"resized to {preview.vocab_size}"
    rows.append(("vocab", vocab))
    shards = ", ".join(f"{name} ({human_bytes(n)})" for name, n in preview.output_shards.items())
    output_bytes = human_bytes(preview.output_bytes)
    rows.append(
        (
            "output",
            f"{preview.out}: {len(preview.output_shards)} shard(s), {output_bytes}: {shards}",
        )
    )
    rows.append(
        ("memory", f"~{human_bytes(preview.working_memory_bytes)} of tensor data in flight")
    )
    needed = human_bytes(preview.disk_needed_bytes or preview.output_bytes)
    if preview.low_disk:  # each shard is uploaded, then deleted: two at most at once
        needed += " (--low-disk: 2 shards at most, plus the small files)"
    rows.append(("disk", f"needs {needed}, {human_bytes(preview.disk_free_bytes)} free"))
    if preview.part is not None and preview.part_shards is not None:
        names = ", ".join(preview.part_shards) or "none"
        rows.append(
            (
                "part",
                f"{preview.part} writes {len(preview.part_shards)} of "
                f"{len(preview.output_shards)} shard(s): {names}",
            )
        )
    return "\n".join(["dry run: nothing was written"] + [f"{k:<8} {v}" for k, v in rows])


def _adapter_line(preview: MergePreview) -> str:
    if preview.adapter_type in ("IA3", "OFT", "VeRA"):  # no alpha / r scale to show
        return f"{preview.adapter} ({preview.adapter_type})"
    rslora = ", rsLoRA" if preview.rslora else ""
    return (
        f"{preview.adapter} (r={preview.rank}, alpha={preview.alpha:g}{rslora}; "
        f"rank_pattern: {preview.rank_pattern_keys} key(s), "
        f"alpha_pattern: {preview.alpha_pattern_keys} key(s))"
    )


def human_bytes(count: int) -> str:
    """``1234567`` -> ``1.2 MB``: decimal units, as the sizes users type (``5GB``)."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
