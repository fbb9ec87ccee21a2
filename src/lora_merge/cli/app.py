"""The ``lora-merge`` command: what the user typed in, one call to :func:`lora_merge.merge`.

This module knows the command line and nothing about tensors: the options are
declared in :mod:`lora_merge.cli.option_types`, checked by the library, and reported
by :mod:`lora_merge.cli.report`. Errors meant for users become one line on stderr
and a documented exit code in :mod:`lora_merge.cli.exit_codes`, and only there.
"""

from __future__ import annotations

import gc
import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from lora_merge.cli.exit_codes import errors_as_exit_codes, exit_codes_epilog, warnings_as_lines
from lora_merge.cli.option_types import (
    AdapterArg,
    AllowNonfiniteOpt,
    AlphaOpt,
    BaseArg,
    CombineOpt,
    DensityOpt,
    DeviceOpt,
    DoubleQuantOpt,
    DryRunOpt,
    DtypeOpt,
    EnableLoraOpt,
    HashInputsOpt,
    InitialAdapterOpt,
    JsonOpt,
    LowDiskOpt,
    MajoritySignMethodOpt,
    MaxMemoryOpt,
    MaxShardSizeOpt,
    OutArg,
    OverwriteOpt,
    PartOpt,
    PrivateOpt,
    PushToHubOpt,
    QloraBaseOpt,
    QuantTypeOpt,
    QuietOpt,
    RankOpt,
    RecomputeInitialOpt,
    ResidualBaseOpt,
    ResumeOpt,
    RevisionOpt,
    SaveMethodOpt,
    SeedOpt,
    SvdClampOpt,
    SvdRankOpt,
    ThreadsOpt,
    UnmergeOpt,
    VerifyOpt,
    VersionOpt,
    WeightsOpt,
)
from lora_merge.cli.report import describe_preview, describe_summary
from lora_merge.options import MergeOptions


class _Command(TyperCommand):
    """Typer's command, with flags shown bare in ``--help`` (``--verify``, not ``--verify <bool>``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # Typer shows the metavar, when set, instead of the type
        return params


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(cls=_Command, epilog=exit_codes_epilog())
def merge_command(
    ctx: typer.Context,
    base: BaseArg,
    adapter: AdapterArg,
    out: OutArg,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    max_memory: MaxMemoryOpt = "1GiB",
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    dry_run: DryRunOpt = False,
    json_summary: JsonOpt = False,
    unmerge: UnmergeOpt = False,
    max_shard_size: MaxShardSizeOpt = "5GB",
    save_method: SaveMethodOpt = "merged_16bit",
    combine: CombineOpt = None,
    weights: WeightsOpt = None,
    density: DensityOpt = None,
    majority_sign_method: MajoritySignMethodOpt = None,
    svd_rank: SvdRankOpt = None,
    svd_clamp: SvdClampOpt = None,
    seed: SeedOpt = None,
    quant_type: QuantTypeOpt = "nf4",
    double_quant: DoubleQuantOpt = False,
    qlora_base: QloraBaseOpt = False,
    initial_adapter: InitialAdapterOpt = None,
    residual_base: ResidualBaseOpt = False,
    recompute_initial: RecomputeInitialOpt = False,
    rank: RankOpt = None,
    alpha: AlphaOpt = None,
    enable_lora: EnableLoraOpt = None,
    push_to_hub: PushToHubOpt = None,
    private: PrivateOpt = False,
    hub_revision: RevisionOpt = None,
    low_disk: LowDiskOpt = False,
    resume: ResumeOpt = False,
    part: PartOpt = None,
    verify: VerifyOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    hash_inputs: HashInputsOpt = True,
    version: VersionOpt = None,
) -> None:
    """Merge a LoRA ADAPTER (or several, combined) into BASE and write a standalone model to OUT.

    Reads the base tensor by tensor, adds scale * B @ A in float32 (float64 for
    fp32 outputs) with one rounding at the end, and writes safetensors shards as
    it goes, so memory stays bounded whatever the model size. OUT appears only
    when complete.
    """
    # lora-merge's warnings as one line on stderr, for this command only: Click closes
    # the context when the command ends, however it ends, and that puts back the
    # printer a program calling main() had.
    ctx.with_resource(warnings_as_lines())
    # The parameters are named as MergeOptions' fields: what the user typed goes to the
    # library's one check as it is.
    typed = {f.name: ctx.params[f.name] for f in fields(MergeOptions) if f.name in ctx.params}
    options = MergeOptions(**typed, command=_command_line(out))
    with errors_as_exit_codes(), ExitStack() as running:
        # Torch-free: the input files' sha256 starts on the cores the import leaves idle.
        from lora_merge.run.hash_ahead import hash_inputs_ahead

        ahead = None if dry_run else hash_inputs_ahead(options)
        if ahead is not None:
            running.enter_context(ahead)  # a failing run stops the hashing threads
        # Torch-free too: BASE's untouched tensors are copied into OUT's staging folder
        # while torch imports; a failing run stops the copies and deletes them.
        from lora_merge.run.copy_ahead import copy_untouched_ahead

        # Its reads are told to the hashing, which follows them.
        pacing = ahead.pacing if ahead is not None else None
        copies = None if dry_run else copy_untouched_ahead(options, pacing)
        if copies is not None:
            running.enter_context(copies)
        # The library (and torch with it) is imported only now that there is work for it:
        # --help, --version and mistyped options return before this and stay fast.
        with _imports_without_collections():
            from lora_merge.api import merge, preview_merge

        if dry_run:
            preview = preview_merge(options)
            typer.echo(json.dumps(preview.to_dict()) if json_summary else describe_preview(preview))
            return
        summary = merge(options, ahead, copies)
    if not quiet:
        typer.echo(describe_summary(summary, unmerge), err=True)
    if json_summary:
        typer.echo(json.dumps(summary.to_dict()))


@contextmanager
def _imports_without_collections() -> Iterator[None]:
    """Import the library (and torch) with the cyclic garbage collector off, then freeze
    what was imported.

    The import creates hundreds of thousands of objects and no garbage worth
    collecting; each collection on the way walks all of them again. Frozen, they are
    never walked again during the merge. (The command owns its process: a Python
    caller of :func:`lora_merge.merge` keeps its collector as it is.)
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _command_line(out: Path) -> str:
    """This run's command line for the model card, with OUT's path written as ``OUT``.

    Where OUT was written is not part of what it holds: two runs that differ only
    in that give byte-identical folders, and no local path goes to the Hub with it.
    """
    arguments = ["OUT" if Path(argument) == out else argument for argument in sys.argv[1:]]
    return shlex.join(["lora-merge", *arguments])


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lora-merge")


if __name__ == "__main__":
    main()
