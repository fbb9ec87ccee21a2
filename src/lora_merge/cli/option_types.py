"""The ``lora-merge`` command's arguments and options, as shared ``Annotated`` aliases.

Each alias carries its flag names, help text and help panel, as huggingface_hub's
``cli/_cli_utils.py`` shares its options. Values reach :class:`~lora_merge.MergeOptions`
as the user typed them: choices and sizes are plain text here (their choices shown
in ``--help`` from the enums of :mod:`lora_merge.options`), and
:func:`~lora_merge.options.checked_options` alone parses and refuses them, so the
command and the Python API accept exactly the same values (in any case) and refuse
the same ones with the same one-line message.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, get_args

import typer

from lora_merge.compute.combine_names import SignMethod
from lora_merge.options import OutputDtype, QuantType, SaveMethod

# Help panels; options without one stay in the default "Options" panel.
OUTPUT = "Output"
SEVERAL_ADAPTERS = "Several adapters"
QUANTIZED_BASES = "Quantized bases"
LORALIB = "loralib checkpoints"
INITIALISATIONS = "PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ adapters"
HUB = "Hub"
SAFETY = "Safety and recovery"


def choices_metavar(choices: type[Enum] | tuple[str, ...]) -> str:
    """``[auto|bf16|fp16|fp32]``: what ``--help`` shows for a choice option."""
    values = [str(m.value) for m in choices] if isinstance(choices, type) else list(choices)
    return f"[{'|'.join(values)}]"


def _size(help_text: str, panel: str | None = None) -> typer.models.OptionInfo:
    return typer.Option(metavar="SIZE", help=help_text, rich_help_panel=panel)


# BASE and ADAPTER stay the text the user typed: a Path would turn "./org/typo" into
# "org/typo", a repo id, and send a mistyped local folder to the Hub.
BaseArg = Annotated[
    str,
    typer.Argument(
        metavar="BASE",
        help="Base model folder (safetensors shards + config.json), or a Hub repo id.",
        show_default=False,
    ),
]
AdapterArg = Annotated[
    list[str],
    typer.Argument(
        metavar="ADAPTER",
        help="PEFT LoRA adapter folder (adapter_config.json + weights), or a Hub repo id; "
        "several adapters are combined into one model (see --combine). With --rank/--alpha, "
        "a loralib checkpoint file.",
        show_default=False,
    ),
]
OutArg = Annotated[
    Path,
    typer.Argument(
        metavar="OUT",
        help="Folder to create with the merged model.",
        show_default=False,
    ),
]

# The default panel: what most runs set.
DtypeOpt = Annotated[
    str,
    typer.Option(
        metavar=choices_metavar(OutputDtype),
        help="Output dtype: auto (keep each tensor's own), bf16, fp16 or fp32 (any case; "
        "bfloat16, float16 and float32 too).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        metavar=choices_metavar(("auto", "cpu", "cuda", "cuda:N")),
        help="Where the merge math runs: auto (a GPU if there is one), cpu, cuda or cuda:N.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help="CPU threads that merge at once (default: the CPUs this process may use, "
        "from its affinity and its cgroup's CPU quota).",
    ),
]
MaxMemoryOpt = Annotated[
    str,
    _size("Working memory for tensor data; larger tensors are merged in row chunks."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT if it exists and is not empty.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar and no summary line.")
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check everything and print the plan (modules, scales, dtypes, shards, memory, "
        "disk) on stdout; write nothing.",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print a JSON summary on stdout when done (with --dry-run: the plan as JSON).",
    ),
]
UnmergeOpt = Annotated[
    bool,
    typer.Option(
        "--unmerge",
        help="Subtract the adapter instead (W - scale * B @ A): BASE is a model this adapter "
        "was merged into, OUT the model without it. Refused for DoRA and for adapters that "
        "replace whole tensors (exit 4).",
    ),
]


def _print_version(value: bool) -> None:
    if value:
        # Imported only for --version: reading the package metadata costs --help 0.03 s.
        from lora_merge._version import __version__

        typer.echo(f"lora-merge {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[
    bool | None,
    typer.Option(
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
]

# Output.
MaxShardSizeOpt = Annotated[str, _size("Largest output shard: 5GB, 500MB, 2GiB or bytes.", OUTPUT)]
SaveMethodOpt = Annotated[
    str,
    typer.Option(
        metavar=choices_metavar(SaveMethod),
        rich_help_panel=OUTPUT,
        help="merged_16bit: a plain model (a quantized BASE: bitsandbytes, FP8, MXFP4, "
        "INT4/INT8 compressed-tensors, GPTQ, AWQ, is dequantized exactly as its format's "
        "reference decoder does, and merged with one rounding; dtype defaults to the "
        "model's). merged_4bit: the merged weights "
        "re-quantized with bitsandbytes in BASE's 4-bit format (or --quant-type/--double-quant "
        "for a 16-bit BASE). merged_native: the merged weights re-quantized in BASE's own "
        "format (FP8 block-wise, compressed-tensors FP8 per channel, MXFP4), config kept; "
        "both round twice and cost quality. lora: write only the adapter, normalized "
        "(safetensors, PEFT layout, config copied). See docs/quantized-bases.md.",
    ),
]
# Several adapters.
CombineOpt = Annotated[
    str | None,
    typer.Option(
        metavar="METHOD",
        rich_help_panel=SEVERAL_ADAPTERS,
        help="How several adapters are combined: cat (default: exactly the weighted sum "
        "of the adapters' deltas); PEFT's linear, ties, dare_linear, dare_ties, "
        "magnitude_prune (A and B combined separately, equal ranks); svd, ties_svd, "
        "dare_linear_svd, dare_ties_svd, magnitude_prune_svd (on full deltas, then a "
        "truncated SVD); ties_full, dare_linear_full, dare_ties_full, magnitude_prune_full "
        "(the TIES/DARE papers' task arithmetic on full deltas, no SVD).",
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        metavar="W1,W2,...",
        rich_help_panel=SEVERAL_ADAPTERS,
        help="One weight per adapter, in order, e.g. 0.7,0.3 (default 1 each; negative "
        "weights subtract).",
    ),
]
DensityOpt = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=SEVERAL_ADAPTERS,
        help="Fraction of values kept, in (0, 1]: required by the ties, dare and "
        "magnitude_prune methods.",
    ),
]
MajoritySignMethodOpt = Annotated[
    str | None,
    typer.Option(
        metavar=choices_metavar(get_args(SignMethod)),
        rich_help_panel=SEVERAL_ADAPTERS,
        help="TIES sign election: by summed values (total, default) or by count (frequency).",
    ),
]
SvdRankOpt = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=SEVERAL_ADAPTERS,
        help="Rank of an *_svd combination (default: the largest adapter rank).",
    ),
]
SvdClampOpt = Annotated[
    float | None,
    typer.Option(
        metavar="QUANTILE",
        rich_help_panel=SEVERAL_ADAPTERS,
        help="Clamp *_svd factors at this quantile of their values, e.g. 0.99 (PEFT svd_clamp).",
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=SEVERAL_ADAPTERS,
        help="Seed of the dare methods' masks (default 0): the same seed gives the same "
        "masks on any device and thread count.",
    ),
]

# Quantized bases: the 4-bit format merged_4bit writes when BASE has none of its own.
QuantTypeOpt = Annotated[
    str,
    typer.Option(
        metavar=choices_metavar(QuantType),
        rich_help_panel=QUANTIZED_BASES,
        help="--save-method merged_4bit or --qlora-base from a 16-bit BASE: nf4 or fp4 (a "
        "4-bit BASE keeps its own).",
    ),
]
DoubleQuantOpt = Annotated[
    bool,
    typer.Option(
        "--double-quant",
        rich_help_panel=QUANTIZED_BASES,
        help="--save-method merged_4bit or --qlora-base from a 16-bit BASE: also quantize the "
        "block scales (bnb_4bit_use_double_quant).",
    ),
]

QloraBaseOpt = Annotated[
    bool,
    typer.Option(
        "--qlora-base",
        rich_help_panel=QUANTIZED_BASES,
        help="For a 16-bit BASE and an adapter trained with QLoRA: merge into the weights "
        "training saw, dequant(quant(W)) in the 4-bit format BASE's config.json records, else "
        "--quant-type/--double-quant (blocksize 64), "
        "bit for bit as bitsandbytes quantizes and dequantizes, instead of W itself "
        "(see docs/qlora-base.md).",
    ),
]

# Adapters whose initialisation changed the base weights (lora_merge.adapter.initialisation).
InitialAdapterOpt = Annotated[
    Path | None,
    typer.Option(
        "--initial-adapter",
        metavar="DIR",
        rich_help_panel=INITIALISATIONS,
        help="The adapter as PiSSA/OLoRA/CorDA/LoRA-GA initialised it (saved before "
        "training): merge scale * (B @ A - B0 @ A0) into the original BASE, as PEFT's "
        "path_initial_model_for_weight_conversion does.",
        show_default=False,
    ),
]
ResidualBaseOpt = Annotated[
    bool,
    typer.Option(
        "--residual-base",
        rich_help_panel=INITIALISATIONS,
        help="BASE already is what such an adapter was trained against (the residual model "
        "PEFT saved, or LoftQ's backbone): merge the adapter as it is.",
    ),
]
RecomputeInitialOpt = Annotated[
    bool,
    typer.Option(
        "--recompute-initial",
        rich_help_panel=INITIALISATIONS,
        help="Recompute B0 @ A0 from BASE, weight by weight (init_lora_weights pissa: SVD; "
        "olora: QR), then merge as --initial-adapter does.",
    ),
]

# loralib checkpoints.
RankOpt = Annotated[
    int | None,
    typer.Option(
        "--rank",
        rich_help_panel=LORALIB,
        help="ADAPTER is a loralib (microsoft/LoRA) checkpoint file, whose layers all have "
        "this r, a positive integer (loralib saves no config). Needs --alpha.",
    ),
]
AlphaOpt = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        rich_help_panel=LORALIB,
        help="lora_alpha of a loralib checkpoint (scale = alpha / rank). Needs --rank.",
    ),
]
EnableLoraOpt = Annotated[
    str | None,
    typer.Option(
        "--enable-lora",
        metavar="LIST",
        rich_help_panel=LORALIB,
        help="loralib MergedLinear's enable_lora, e.g. 1,0,1 (q and v of a fused qkv); "
        "needed when only some output groups are adapted.",
    ),
]

# Hub.
PushToHubOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        rich_help_panel=HUB,
        help="After a successful merge, upload OUT to this Hub model repo (created if "
        "needed; token from HF_TOKEN or `hf auth login`). A failed upload is exit 9, OUT kept.",
        show_default=False,
    ),
]
PrivateOpt = Annotated[
    bool,
    typer.Option("--private", rich_help_panel=HUB, help="Create the --push-to-hub repo private."),
]
LowDiskOpt = Annotated[
    bool,
    typer.Option(
        "--low-disk",
        rich_help_panel=HUB,
        help="With --push-to-hub: read a Hub BASE by range requests (no base shard is "
        "stored) and upload each output shard as soon as it is written, then delete it. "
        "Local disk holds at most 2 shards (choose with --max-shard-size); OUT keeps the "
        "small files; one commit at the end.",
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="BRANCH",
        rich_help_panel=HUB,
        help="Branch of the --push-to-hub repo to commit to (created if needed).",
        show_default=False,
    ),
]

# Safety and recovery.
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        rich_help_panel=SAFETY,
        help="Make this run resumable (a checksummed journal of finished shards) and "
        "continue an interrupted --resume run of the same merge, keeping its verified shards.",
    ),
]
PartOpt = Annotated[
    str | None,
    typer.Option(
        "--part",
        metavar="I/N",
        rich_help_panel=SAFETY,
        help="Write only output shards k with k % N == I, into a staging area every part "
        "shares (run parts on several machines with a shared file system), or with "
        "--push-to-hub REPO --low-disk upload them to REPO's staging branch; then run the "
        "same command without --part, with --resume, to finish OUT.",
        show_default=False,
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        rich_help_panel=SAFETY,
        help="Before OUT appears, reopen it: every tensor present with its planned dtype and "
        "shape, copied tensors byte-identical to BASE, sampled merged rows equal to a float64 "
        "recomputation (exit 8 if not).",
    ),
]
AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        rich_help_panel=SAFETY,
        help="Write NaN/Inf produced by the merge instead of refusing (exit 7).",
    ),
]
HashInputsOpt = Annotated[
    bool,
    typer.Option(
        "--hash-inputs/--no-hash-inputs",
        rich_help_panel=SAFETY,
        help="Record the sha256 of every input file in OUT's model card (README.md); "
        "hashing runs beside the merge. A digest already known is not computed again: files "
        "from the Hub cache or `hf download --local-dir`, and files hashed by an earlier run "
        "(a per-user digest cache; LORA_MERGE_CACHE=DIR moves it; LORA_MERGE_CACHE=off turns "
        "it off and hashes every file outside the Hub cache).",
    ),
]
