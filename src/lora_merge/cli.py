"""The ``lora-merge`` command: Typer options in, one call to :func:`lora_merge.merge`.

This module knows the command line and nothing about tensors. Errors meant for
users become one line on stderr and a documented exit code, here and only here.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from lora_merge import __version__
from lora_merge.api import MergePreview, merge, preview_merge
from lora_merge.errors import (
    EXIT_INTERNAL,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    LoraMergeError,
    LoraMergeWarning,
    MergeInterrupted,
)
from lora_merge.finish.publish import check_push_target
from lora_merge.options import (
    MergeOptions,
    checked_options,
    parse_dtype,
    parse_quant_type,
    parse_save_method,
    parse_size,
    resolve_device,
)

DEBUG_ENV = "LORA_MERGE_DEBUG"

EPILOG = """\
Exit codes: 0 merged; 1 internal error (a bug: please report it, rerun with
LORA_MERGE_DEBUG=1 for a traceback); 2 bad command line; 3 BASE, ADAPTER or a
weights file not found; 4 invalid or unsupported input; 5 adapter does not fit
the base; 6 OUT refused (exists, inside an input, disk too small);
7 NaN/Inf in the adapter or produced by the merge; 8 --verify found
the output wrong; 9 --push-to-hub failed (OUT is complete and kept);
130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lora-merge {__version__}")
        raise typer.Exit()


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """A Typer callback that validates with a library parser: bad values are usage errors (2)."""

    def callback(value: str) -> str:
        try:
            parse(value)
        except LoraMergeError as err:
            raise typer.BadParameter(str(err)) from err
        return value

    return callback


def _checked_optional(check: Callable[[str], object]) -> Callable[[str | None], str | None]:
    """Like :func:`_checked` for an option that may be left out."""
    callback = _checked(check)

    def optional(value: str | None) -> str | None:
        return None if value is None else callback(value)

    return optional


# Argument and option makers shared by the parameters, as huggingface_hub's CLI shares aliases.
def _folder(metavar: str, help_text: str) -> Any:
    return typer.Argument(metavar=metavar, help=help_text, show_default=False)


def _size(help_text: str) -> Any:
    return typer.Option(metavar="SIZE", callback=_checked(parse_size), help=help_text)


@app.command(epilog=EPILOG)
def merge_command(
    ctx: typer.Context,
    base: Annotated[Path, _folder("BASE", "Base model folder (safetensors shards + config.json).")],
    adapters: Annotated[
        list[Path],
        _folder(
            "ADAPTER",
            "PEFT LoRA adapter folder (adapter_config.json + weights); several adapters are "
            "combined into one model (see --combine). With --rank/--alpha, a loralib "
            "checkpoint file.",
        ),
    ],
    out: Annotated[Path, _folder("OUT", "Folder to create with the merged model.")],
    dtype: Annotated[
        str,
        typer.Option(
            callback=_checked(parse_dtype),
            help="Output dtype: auto (keep each tensor's own), bf16, fp16 or fp32.",
        ),
    ] = "auto",
    max_shard_size: Annotated[
        str, _size("Largest output shard: 5GB, 500MB, 2GiB or bytes.")
    ] = "5GB",
    max_memory: Annotated[
        str, _size("Working memory for tensor data; larger tensors are merged in row chunks.")
    ] = "1GiB",
    device: Annotated[
        str,
        typer.Option(
            callback=_checked(resolve_device),
            help="Where the merge math runs: auto (a GPU if there is one), cpu, cuda or cuda:N.",
        ),
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists and is not empty.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar and no summary line.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Make this run resumable (a checksummed journal of finished shards) and "
            "continue an interrupted --resume run of the same merge, keeping its verified shards.",
        ),
    ] = False,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            "--allow-nonfinite",
            help="Write NaN/Inf produced by the merge instead of refusing (exit 7).",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Before OUT appears, reopen it: every tensor present with its planned dtype and "
            "shape, copied tensors byte-identical to BASE, sampled merged rows equal to a float64 "
            "recomputation (exit 8 if not).",
        ),
    ] = False,
    unmerge: Annotated[
        bool,
        typer.Option(
            "--unmerge",
            help="Subtract the adapter instead (W - scale * B @ A): BASE is a model this adapter "
            "was merged into, OUT the model without it. Refused for DoRA and for adapters that "
            "replace whole tensors (exit 4).",
        ),
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            min=1,
            help="ADAPTER is a loralib (microsoft/LoRA) checkpoint file, whose layers all have "
            "this r (loralib saves no config). Needs --alpha.",
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            help="lora_alpha of a loralib checkpoint (scale = alpha / rank). Needs --rank.",
        ),
    ] = None,
    enable_lora: Annotated[
        str | None,
        typer.Option(
            "--enable-lora",
            metavar="LIST",
            help="loralib MergedLinear's enable_lora, e.g. 1,0,1 (q and v of a fused qkv); "
            "needed when only some output groups are adapted.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check everything and print the plan (modules, scales, dtypes, shards, memory, "
            "disk) on stdout; write nothing.",
        ),
    ] = False,
    hash_inputs: Annotated[
        bool,
        typer.Option(
            "--hash-inputs/--no-hash-inputs",
            help="Record the sha256 of every input file in OUT's model card (README.md); "
            "hashing runs beside the merge, and files from the Hub cache are not read again.",
        ),
    ] = True,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="REPO",
            callback=_checked_optional(check_push_target),
            help="After a successful merge, upload OUT to this Hub model repo (created if "
            "needed; token from HF_TOKEN or `hf auth login`). A failed upload is exit 9, OUT kept.",
            show_default=False,
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the --push-to-hub repo private.")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            metavar="BRANCH",
            help="Branch of the --push-to-hub repo to commit to (created if needed).",
            show_default=False,
        ),
    ] = None,
    json_summary: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout when done.")
    ] = False,
    combine: Annotated[
        str | None,
        typer.Option(
            metavar="METHOD",
            help="How several adapters are combined: cat (default: exactly the weighted sum "
            "of the adapters' deltas); PEFT's linear, ties, dare_linear, dare_ties, "
            "magnitude_prune (A and B combined separately, equal ranks); svd, ties_svd, "
            "dare_linear_svd, dare_ties_svd, magnitude_prune_svd (on full deltas, then a "
            "truncated SVD); ties_full, dare_linear_full, dare_ties_full, magnitude_prune_full "
            "(the TIES/DARE papers' task arithmetic on full deltas, no SVD).",
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            metavar="W1,W2,...",
            help="One weight per adapter, in order, e.g. 0.7,0.3 (default 1 each; negative "
            "weights subtract).",
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            help="Fraction of values kept, in (0, 1]: required by the ties, dare and "
            "magnitude_prune methods.",
        ),
    ] = None,
    majority_sign_method: Annotated[
        str | None,
        typer.Option(
            metavar="total|frequency",
            help="TIES sign election: by summed values (total, default) or by count (frequency).",
        ),
    ] = None,
    svd_rank: Annotated[
        int | None,
        typer.Option(help="Rank of an *_svd combination (default: the largest adapter rank)."),
    ] = None,
    svd_clamp: Annotated[
        float | None,
        typer.Option(
            metavar="QUANTILE",
            help="Clamp *_svd factors at this quantile of their values, e.g. 0.99 (PEFT svd_clamp).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the dare methods' masks (default 0): the same seed gives the same "
            "masks on any device and thread count.",
        ),
    ] = None,
    save_method: Annotated[
        str,
        typer.Option(
            callback=_checked(parse_save_method),
            help="merged_16bit: a plain model (a bitsandbytes 4/8-bit BASE is dequantized, "
            "exactly as bitsandbytes does, and merged with one rounding; dtype defaults to "
            "bnb_4bit_compute_dtype). merged_4bit: the merged weights re-quantized with "
            "bitsandbytes in BASE's 4-bit format (or --quant-type/--double-quant for a 16-bit "
            "BASE); this rounds twice and costs quality. lora: write only the adapter, "
            "normalized (safetensors, PEFT layout, config copied).",
        ),
    ] = "merged_16bit",
    quant_type: Annotated[
        str,
        typer.Option(
            callback=_checked(parse_quant_type),
            help="merged_4bit from a 16-bit BASE: nf4 or fp4 (a 4-bit BASE keeps its own).",
        ),
    ] = "nf4",
    double_quant: Annotated[
        bool,
        typer.Option(
            "--double-quant",
            help="merged_4bit from a 16-bit BASE: also quantize the block scales "
            "(bnb_4bit_use_double_quant).",
        ),
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """Merge a LoRA ADAPTER (or several, combined) into BASE and write a standalone model to OUT.

    Reads the base tensor by tensor, adds scale * B @ A in float32 (float64 for
    fp32 outputs) with one rounding at the end, and writes safetensors shards as
    it goes, so memory stays bounded whatever the model size. OUT appears only
    when complete.
    """
    if not adapters:
        raise typer.BadParameter("give BASE, at least one ADAPTER, then OUT", param_hint="ADAPTER")
    # lora-merge's warnings as one line on stderr, for this command only: Click closes
    # the context when the command ends, however it ends, and that puts back the
    # printer a program calling main() had.
    ctx.with_resource(_warnings_as_lines())
    options = MergeOptions(
        base=base,
        adapter=adapters[0] if len(adapters) == 1 else adapters,
        out=out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        max_memory=max_memory,
        device=device,
        overwrite=overwrite,
        quiet=quiet,
        resume=resume,
        allow_nonfinite=allow_nonfinite,
        verify=verify,
        hash_inputs=hash_inputs,
        push_to_hub=push_to_hub,
        private=private,
        hub_revision=revision,
        command=_command_line(out),
        combine=combine,
        weights=weights,
        density=density,
        majority_sign_method=majority_sign_method,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        seed=seed,
        save_method=save_method,
        quant_type=quant_type,
        double_quant=double_quant,
        unmerge=unmerge,
        rank=rank,
        alpha=alpha,
        enable_lora=enable_lora,
    )
    try:
        options = checked_options(options)  # as merge() does, but before the signal handler
    except LoraMergeError as err:
        _fail(err)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        if dry_run:
            preview = preview_merge(options)
            typer.echo(
                json.dumps(preview.to_dict()) if json_summary else _describe_preview(preview)
            )
            return
        summary = merge(options)
    except KeyboardInterrupt:
        _fail(MergeInterrupted("SIGINT", EXIT_SIGINT))
    except LoraMergeError as err:
        _fail(err)
    except Exception as err:  # a bug: say so in one line, with the way to get details
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        typer.echo(
            f"lora-merge: internal error: {type(err).__name__}: {err} (please report it; "
            f"set {DEBUG_ENV}=1 for a traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_INTERNAL) from err
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    if not quiet:
        typer.echo(
            f"{'unmerged' if unmerge else 'merged'} {summary.lora_modules} LoRA modules into "
            f"{summary.tensors} tensors "
            f"({summary.copied} copied unchanged, {summary.replaced} replaced by the adapter's"
            + (
                f", {summary.resumed_shards} shard(s) kept from the interrupted run"
                if summary.resumed_shards
                else ""
            )
            + "), "
            f"wrote {_human_bytes(summary.bytes_written)} in {summary.shards} shard(s) to "
            f"{summary.out} in {summary.seconds:.1f} s"
            + (f"; pushed to {summary.commit_url}" if summary.commit_url else ""),
            err=True,
        )
    if json_summary:
        typer.echo(json.dumps(summary.to_dict()))


def _command_line(out: Path) -> str:
    """This run's command line for the model card, with OUT's path written as ``OUT``.

    Where OUT was written is not part of what it holds: two runs that differ only
    in that give byte-identical folders, and no local path goes to the Hub with it.
    """
    arguments = ["OUT" if Path(argument) == out else argument for argument in sys.argv[1:]]
    return shlex.join(["lora-merge", *arguments])


def _describe_preview(preview: MergePreview) -> str:
    """The --dry-run report, one aspect per line."""
    layers = ", ".join(f"{n} {kind}" for kind, n in sorted(preview.lora_modules_by_layer.items()))
    scales = ", ".join(f"{scale} ({n} modules)" for scale, n in sorted(preview.scales.items()))
    dtypes_in = ", ".join(f"{n} {dtype}" for dtype, n in sorted(preview.dtypes_in.items()))
    dtypes_out = ", ".join(f"{n} {dtype}" for dtype, n in sorted(preview.dtypes_out.items()))
    shards = ", ".join(f"{name} ({_human_bytes(n)})" for name, n in preview.output_shards.items())
    rows = [
        (
            "base",
            f"{preview.base} ({preview.base_shards} file(s), {_human_bytes(preview.base_bytes)})",
        ),
        (
            "adapter",
            f"{preview.adapter} (r={preview.rank}, alpha={preview.alpha:g}"
            f"{', rsLoRA' if preview.rslora else ''}; rank_pattern: {preview.rank_pattern_keys} "
            f"key(s), alpha_pattern: {preview.alpha_pattern_keys} key(s))",
        ),
        *(
            [
                (
                    "combine",
                    f"{len(preview.adapters)} adapter(s) by {preview.combine}: "
                    + ", ".join(preview.adapters),
                )
            ]
            if preview.combine
            else []
        ),
        ("modules", f"{sum(preview.lora_modules_by_layer.values())} LoRA ({layers or 'none'})"),
        *(
            [("quant", f"{preview.quantization}, dequantized ({preview.save_method})")]
            if preview.quantization
            else []
        ),
        ("scales", f"{len(preview.scales)} distinct: {scales or 'none'}"),
        (
            "tensors",
            f"{preview.copied} copied unchanged, {preview.replaced} replaced by the adapter's",
        ),
        ("dtype", f"{dtypes_in} -> {dtypes_out}"),
        (
            "vocab",
            "unchanged" if preview.vocab_size is None else f"resized to {preview.vocab_size}",
        ),
        (
            "output",
            f"{preview.out}: {len(preview.output_shards)} shard(s), {_human_bytes(preview.output_bytes)}: {shards}",
        ),
        ("memory", f"~{_human_bytes(preview.working_memory_bytes)} of tensor data in flight"),
        (
            "disk",
            f"needs {_human_bytes(preview.output_bytes)}, {_human_bytes(preview.disk_free_bytes)} free",
        ),
    ]
    return "\n".join(["dry run: nothing was written"] + [f"{k:<8} {v}" for k, v in rows])


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Inside the block, warnings from lora-merge print as one line on stderr; others as
    the printer in place before it prints them. That printer is restored on the way out."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, LoraMergeWarning):
            typer.echo(f"lora-merge: warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise MergeInterrupted("SIGTERM", EXIT_SIGTERM)


def _fail(err: LoraMergeError) -> NoReturn:
    if os.environ.get(DEBUG_ENV):
        traceback.print_exc()
    typer.echo(f"lora-merge: error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lora-merge")


if __name__ == "__main__":
    main()
