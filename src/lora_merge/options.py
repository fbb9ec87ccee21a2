"""The options of a merge, shared by the CLI and the Python API."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_merge.adapter.loralib import loralib_settings
from lora_merge.adapter.recipe import build_combine_recipe, parse_weights
from lora_merge.errors import UsageError
from lora_merge.finish.publish import check_push_target

# Names accepted by --dtype, and the torch dtype each means. "auto" keeps every
# tensor's own dtype (a bf16 model with fp32 norms stays exactly that).
DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Parse a byte count such as ``5GB``, ``500MB``, ``2GiB`` or ``1048576``.

    Decimal units (KB, MB, GB) are powers of 1000 and binary units (KiB, MiB,
    GiB) powers of 1024, as in huggingface_hub's ``max_shard_size``.

    Raises:
        UsageError: the text is not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif not isinstance(value, str):
        raise UsageError(f"size {value!r} is not a number of bytes or a text such as 500MB")
    else:
        match = _SIZE_PATTERN.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise UsageError(
                f"size {value!r} is not understood: write a number of bytes or a number "
                "with a unit (KB, MB, GB, KiB, MiB, GiB), e.g. 500MB or 2GiB"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise UsageError(f"size {value!r} must be larger than zero")
    return size


def parse_dtype(name: str) -> torch.dtype | None:
    """Return the torch dtype for a ``--dtype`` name (any case), or None for ``auto``.

    Raises:
        UsageError: not one of the names.
    """
    key = _choice_key(name)
    if key == "auto":
        return None
    if key not in DTYPE_BY_NAME:
        raise UsageError(f"--dtype {name!r} is not one of auto, bf16, fp16, fp32")
    return DTYPE_BY_NAME[key]


# --save-method values (Unsloth's names). merged_16bit: a plain model, quantized
# weights dequantized; merged_4bit: re-quantized with bitsandbytes; lora: the adapter only.
SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
QUANT_TYPES = ("nf4", "fp4")
# The block sizes bitsandbytes' quantize_4bit accepts.
QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _choice_key(value: object) -> str:
    """A choice as compared: the help lists choices in lower case, and any case means them."""
    return value.strip().lower() if isinstance(value, str) else repr(value)


def parse_save_method(name: str) -> str:
    """Check a ``--save-method`` value (any case); return it in lower case.

    Raises:
        UsageError: not one of :data:`SAVE_METHODS`.
    """
    key = _choice_key(name)
    if key not in SAVE_METHODS:
        raise UsageError(f"--save-method {name!r} is not one of {', '.join(SAVE_METHODS)}")
    return key


def parse_quant_type(name: str) -> str:
    """Check a ``--quant-type`` value (``nf4`` or ``fp4``, any case); return it in lower case.

    Raises:
        UsageError: not one of :data:`QUANT_TYPES`.
    """
    key = _choice_key(name)
    if key not in QUANT_TYPES:
        raise UsageError(f"--quant-type {name!r} is not one of {', '.join(QUANT_TYPES)}")
    return key


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; others as given (any case).

    Raises:
        UsageError: the name is not a device, or CUDA is asked for but absent.
    """
    key = _choice_key(name)
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name!r} was asked for but this machine has no CUDA GPU; use --device cpu"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"--device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return device


@dataclass(frozen=True)
class MergeOptions:
    """Everything one merge needs; the CLI builds one, Python callers may too.

    Attributes:
        base: folder of the base model (safetensors shards, config.json).
        adapter: folder of the PEFT LoRA adapter, or a sequence of several adapter
            folders to combine into one model (see ``combine``).
        out: folder to create with the merged model.
        dtype: ``auto`` (keep each tensor's dtype) or bf16 / fp16 / fp32.
        max_shard_size: largest output shard, in bytes or as ``5GB``-style text.
        max_memory: working-set budget for tensor data; big tensors are merged
            in row chunks that fit in it.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where the merge math runs.
        overwrite: replace an existing non-empty OUT.
        quiet: no progress bar.
        resume: keep a checksummed journal so an interrupted run can be resumed,
            and resume an interrupted ``resume`` run of the same merge.
        allow_nonfinite: write NaN/Inf produced by the merge instead of refusing.
        verify: reopen the written shards and check them before OUT appears.
        hash_inputs: record the sha256 of every input file in OUT's model card
            (computed on a background thread; Hub cache files are not read again).
        push_to_hub: a Hub repo id to upload OUT to once it is complete.
        private: create that repo private (when it does not exist yet).
        hub_revision: the branch of that repo to commit to (created if needed).
        command: the command line, recorded in the model card (None from Python).
        combine: how several adapters are combined (``cat`` by default; see the
            README's table of methods). Setting it, or ``weights``, with one
            adapter merges that adapter through the same path.
        weights: one weight per adapter, as ``"0.7,0.3"`` or a sequence (default 1.0 each).
        density: fraction of values kept by the ties, dare and magnitude_prune methods.
        majority_sign_method: TIES sign election, ``total`` (default) or ``frequency``.
        svd_rank: rank of an ``*_svd`` combination (default: the largest adapter rank).
        svd_clamp: quantile in (0, 1] at which ``*_svd`` factors are clamped.
        seed: seed of the dare methods' random masks (default 0).
        save_method: ``merged_16bit`` (a plain model; a quantized base is
            dequantized), ``merged_4bit`` (re-quantized with bitsandbytes, rounding
            twice) or ``lora`` (only the adapter, normalized).
        quant_type / double_quant / quant_blocksize: the 4-bit format for
            ``merged_4bit`` from an unquantized base (a 4-bit base's own format wins).
        unmerge: subtract the adapter (``W - scale * B @ A``) instead of adding it,
            turning a merged model back into its base.
        rank / alpha: for a loralib (microsoft/LoRA) checkpoint file, which records
            neither; ADAPTER is then that file.
        enable_lora: loralib MergedLinear's ``enable_lora``, e.g. ``"1,0,1"``.
    """

    base: Path | str
    adapter: Path | str | Sequence[Path | str]
    out: Path | str
    dtype: str = "auto"
    max_shard_size: int | str = "5GB"
    max_memory: int | str = "1GiB"
    device: str = "auto"
    overwrite: bool = False
    quiet: bool = False
    resume: bool = False
    allow_nonfinite: bool = False
    verify: bool = False
    hash_inputs: bool = True
    push_to_hub: str | None = None
    private: bool = False
    hub_revision: str | None = None
    command: str | None = None
    combine: str | None = None
    weights: str | Sequence[float] | None = None
    density: float | None = None
    majority_sign_method: str | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None
    save_method: str = "merged_16bit"
    quant_type: str = "nf4"
    double_quant: bool = False
    quant_blocksize: int = 64
    unmerge: bool = False
    rank: int | None = None
    alpha: float | None = None
    enable_lora: str | None = None

    @property
    def adapters(self) -> list[Path | str]:
        """The adapter(s), as a list."""
        if isinstance(self.adapter, Path | str):
            return [self.adapter]
        return list(self.adapter)

    @property
    def combines(self) -> bool:
        """Several adapters, or combination options: the adapters go through a combination."""
        return len(self.adapters) > 1 or any(
            value is not None
            for value in (
                self.combine,
                self.weights,
                self.density,
                self.majority_sign_method,
                self.svd_rank,
                self.svd_clamp,
                self.seed,
            )
        )


def checked_options(options: MergeOptions) -> MergeOptions:
    """``options`` with every value checked and normalised, and every conflict refused.

    The CLI and :func:`lora_merge.merge` both start here, before any input is read
    or downloaded and before OUT is touched: a mistake costs nothing, and a value
    means the same from either (``quant_type="NF4"`` is ``nf4``). Choices are
    returned in lower case and sizes as byte counts; checking the result again
    changes nothing.

    Raises:
        UsageError: a value that is not one of its choices or out of range, or
            options that contradict each other or would be silently ignored.
    """
    if not options.adapters:
        raise UsageError("give at least one ADAPTER")
    parse_dtype(options.dtype)
    resolve_device(options.device)
    if options.quant_blocksize not in QUANT_BLOCKSIZES:
        raise UsageError(
            f"quant_blocksize {options.quant_blocksize!r} is not one of "
            f"{', '.join(map(str, QUANT_BLOCKSIZES))} (the block sizes bitsandbytes quantizes with)"
        )
    normalised = replace(
        options,
        dtype=_choice_key(options.dtype),
        device=_choice_key(options.device),
        max_shard_size=parse_size(options.max_shard_size),
        max_memory=parse_size(options.max_memory),
        save_method=parse_save_method(options.save_method),
        quant_type=parse_quant_type(options.quant_type),
        combine=None if options.combine is None else _choice_key(options.combine),
        majority_sign_method=(
            None
            if options.majority_sign_method is None
            else _choice_key(options.majority_sign_method)
        ),
        weights=None if options.weights is None else parse_weights(options.weights),
    )
    _refuse_conflicts(normalised)
    return normalised


def _refuse_conflicts(options: MergeOptions) -> None:
    """Options that contradict each other, or that the run would ignore without saying so.

    Raises:
        UsageError: the first conflict found.
    """
    loralib = loralib_settings(options.rank, options.alpha, options.enable_lora)
    if options.combines:
        build_combine_recipe(
            len(options.adapters),
            combine=options.combine,
            weights=options.weights,
            density=options.density,
            majority_sign_method=options.majority_sign_method,
            svd_rank=options.svd_rank,
            svd_clamp=options.svd_clamp,
            seed=options.seed,
        )
        if loralib is not None or options.unmerge:
            raise UsageError(
                "--unmerge and loralib checkpoints (--rank/--alpha) take one adapter and no "
                "--combine options; combine the adapters first, then unmerge the combination"
            )
    if options.save_method == "lora":
        if options.combines:
            raise UsageError(
                "--save-method lora writes one adapter as it is; it cannot be combined with "
                "several adapters or --combine options (merge them into a model instead)"
            )
        if loralib is not None or options.unmerge:
            raise UsageError(
                "--save-method lora writes a PEFT adapter as it is; it cannot be used with "
                "--unmerge or a loralib checkpoint (--rank/--alpha)"
            )
        ignored = [
            name
            for name, given in (
                ("--dtype", options.dtype != "auto"),
                ("--verify", options.verify),
                ("--allow-nonfinite", options.allow_nonfinite),
            )
            if given
        ]
        if ignored:
            raise UsageError(
                f"{' and '.join(ignored)} apply to a merged model; --save-method lora writes "
                "the adapter's tensors as they are: leave them out"
            )
    if options.double_quant and options.save_method != "merged_4bit":
        raise UsageError("--double-quant applies only with --save-method merged_4bit")
    if options.push_to_hub is None:
        if options.private or options.hub_revision is not None:
            raise UsageError("--private and --revision only apply with --push-to-hub")
    else:
        check_push_target(options.push_to_hub)
