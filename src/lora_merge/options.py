"""The options of a merge: what a caller writes, and the checked settings the run reads.

:class:`MergeOptions` is what the CLI builds from the command line and what a
Python caller writes: text and numbers as typed. :func:`checked_options` turns it,
once and before any input is read, into :class:`MergeSettings`: every value
parsed (torch dtype and device, sizes in bytes, choices as enums, the combination
recipe, the loralib settings) and every conflict between options refused as a
usage error (exit 2). Everything after that reads the settings, never the options,
so the CLI and the Python API accept and refuse exactly the same things.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lora_merge.adapter.loralib import LoralibSettings, loralib_settings
from lora_merge.adapter.recipe import CombineRecipe, build_combine_recipe
from lora_merge.errors import UsageError
from lora_merge.finish.parts import Part, parse_part, refuse_with_part
from lora_merge.finish.shard_sink import check_hub_options
from lora_merge.stream.machine import check_thread_count, resolve_device

# torch is imported where a value needs it: --help, --version and usage errors need none.
if TYPE_CHECKING:
    import torch

_ChoiceT = TypeVar("_ChoiceT", bound="Choice")


class Choice(str, Enum):
    """An option's choices: each member compares, prints and serialises as its value."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(
        cls: type[_ChoiceT], value: object, option: str, aliases: Mapping[str, str] | None = None
    ) -> _ChoiceT:
        """The member a value names, in any case (``NF4`` is ``nf4``).

        Raises:
            UsageError: the value names no member; the message quotes it as given.
        """
        key = value.strip().lower() if isinstance(value, str) else repr(value)
        key = (aliases or {}).get(key, key)
        for member in cls:
            if member.value == key:
                return member
        raise UsageError(f"{option} {value!r} is not one of {', '.join(m.value for m in cls)}")


class OutputDtype(Choice):
    """``--dtype``: ``auto`` keeps every tensor's own dtype (bf16 weights with fp32 norms stay so)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype every floating-point tensor is written in; None for ``auto``."""
        if self is OutputDtype.AUTO:
            return None
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


# torch's own names mean the same as the short ones.
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class SaveMethod(Choice):
    """``--save-method`` (Unsloth's names): what OUT holds."""

    MERGED_16BIT = "merged_16bit"  # a plain model; quantized weights are dequantized
    MERGED_4BIT = "merged_4bit"  # the merged weights re-quantized with bitsandbytes
    LORA = "lora"  # the adapter only, normalised


class QuantType(Choice):
    """``--quant-type``: the 4-bit code of ``merged_4bit`` from a 16-bit base."""

    NF4 = "nf4"
    FP4 = "fp4"


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


def parse_size(value: int | str, option: str = "size") -> int:
    """Parse a byte count such as ``5GB``, ``500MB``, ``2GiB`` or ``1048576``.

    Decimal units (KB, MB, GB) are powers of 1000 and binary units (KiB, MiB,
    GiB) powers of 1024, as in huggingface_hub's ``max_shard_size``.

    Args:
        value: the size, as a number of bytes or a text.
        option: what messages call it, e.g. ``--max-memory``.

    Raises:
        UsageError: the text is not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif not isinstance(value, str):
        raise UsageError(f"{option} {value!r} is not a number of bytes or a text such as 500MB")
    else:
        match = _SIZE_PATTERN.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise UsageError(
                f"{option} {value!r} is not understood: write a number of bytes or a number "
                "with a unit (KB, MB, GB, KiB, MiB, GiB), e.g. 500MB or 2GiB"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise UsageError(f"{option} {value!r} must be larger than zero")
    return size


@dataclass(frozen=True)
class MergeOptions:
    """Everything one merge needs, as a caller writes it; the CLI builds one, Python callers may too.

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
        threads: CPU threads that merge at once; None: the CPUs this process may use
            (its affinity mask, capped by its cgroup's CPU quota).
        overwrite: replace an existing non-empty OUT.
        quiet: no progress bar.
        resume: keep a checksummed journal so an interrupted run can be resumed,
            and resume an interrupted ``resume`` run of the same merge.
        allow_nonfinite: write NaN/Inf produced by the merge instead of refusing.
        verify: reopen the written shards and check them before OUT appears.
        hash_inputs: record the sha256 of every input file in OUT's model card.
        push_to_hub: a Hub repo id to upload OUT to once it is complete.
        private: create that repo private (when it does not exist yet).
        hub_revision: the branch of that repo to commit to (created if needed).
        low_disk: with ``push_to_hub``, upload each shard as written, then delete it;
            a Hub BASE is read by range requests (see :mod:`lora_merge.finish.hub_upload`).
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
        unmerge: subtract the adapter (``W - scale * B @ A``): a merged model -> its base.
        rank / alpha: for a loralib (microsoft/LoRA) checkpoint file, which records
            neither; ADAPTER is then that file.
        enable_lora: loralib MergedLinear's ``enable_lora``, e.g. ``"1,0,1"``.
        part: ``"I/N"``: write only output shards ``k % N == I`` (:mod:`lora_merge.finish.parts`).
    """

    base: Path | str
    adapter: Path | str | Sequence[Path | str]
    out: Path | str
    dtype: str = "auto"
    max_shard_size: int | str = "5GB"
    max_memory: int | str = "1GiB"
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False
    resume: bool = False
    allow_nonfinite: bool = False
    verify: bool = False
    hash_inputs: bool = True
    push_to_hub: str | None = None
    private: bool = False
    hub_revision: str | None = None
    low_disk: bool = False
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
    part: str | None = None

    @property
    def adapters(self) -> list[Path | str]:
        """The adapter(s), as a list."""
        if isinstance(self.adapter, Path | str):
            return [self.adapter]
        return list(self.adapter)

    @property
    def combines(self) -> bool:
        """Several adapters, or combination options: the adapters go through a combination
        (one adapter with combination options is merged through the same path)."""
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


@dataclass(frozen=True)
class MergeSettings:
    """One merge's options, checked and parsed: what every step after the check reads.

    Built only by :func:`checked_options`. Paths stay as the caller wrote them
    (they may be Hub repo ids, and the model card records them as given).

    Attributes:
        base / adapters / out: the inputs and OUT, as given; ``adapters`` has one or more.
        output_dtype: the dtype of every floating-point output tensor; None keeps each one's.
        max_shard_size / max_memory: byte counts.
        device: where the merge math runs (``auto`` resolved).
        threads: CPU threads that merge at once, as given (None: as many as the process may use).
        save_method / quant_type / double_quant / quant_blocksize: what OUT holds,
            and the 4-bit format of ``merged_4bit`` from a 16-bit base.
        recipe: how the adapters are combined; None merges one adapter as it is.
        loralib: rank, alpha and groups of a loralib checkpoint; None for PEFT adapters.
        unmerge: subtract the adapter instead of adding it.
        overwrite / quiet / resume / allow_nonfinite / verify / hash_inputs /
            push_to_hub / private / hub_revision / command / part: as in :class:`MergeOptions`.
    """

    base: Path | str
    adapters: tuple[Path | str, ...]
    out: Path | str
    output_dtype: torch.dtype | None
    max_shard_size: int
    max_memory: int
    device: torch.device
    save_method: SaveMethod
    quant_type: QuantType
    double_quant: bool
    quant_blocksize: int
    recipe: CombineRecipe | None
    loralib: LoralibSettings | None
    unmerge: bool
    overwrite: bool
    quiet: bool
    resume: bool
    allow_nonfinite: bool
    verify: bool
    hash_inputs: bool
    push_to_hub: str | None
    private: bool
    hub_revision: str | None
    command: str | None
    low_disk: bool = False
    part: Part | None = None
    threads: int | None = None


def checked_options(options: MergeOptions) -> MergeSettings:
    """Parse and check ``options``: the one place a merge's options are read.

    The CLI (through :func:`lora_merge.merge`) and Python callers both start here,
    before any input is read or downloaded and before OUT is touched: a mistake
    costs nothing, and a value means the same from either (``quant_type="NF4"``
    is ``nf4``).

    Raises:
        UsageError: a value that is not one of its choices or out of range, or
            options that contradict each other or would be silently ignored.
    """
    adapters = tuple(options.adapters)
    if not adapters:
        raise UsageError("give at least one ADAPTER")
    output_dtype = OutputDtype.parse(options.dtype, "--dtype", _DTYPE_ALIASES).torch_dtype
    device = resolve_device(options.device)
    from lora_merge.compute.dequantize import check_four_bit_blocksize  # imports torch

    check_four_bit_blocksize(options.quant_blocksize)
    settings = MergeSettings(
        base=options.base,
        adapters=adapters,
        out=options.out,
        output_dtype=output_dtype,
        max_shard_size=parse_size(options.max_shard_size, "--max-shard-size"),
        max_memory=parse_size(options.max_memory, "--max-memory"),
        device=device,
        save_method=SaveMethod.parse(options.save_method, "--save-method"),
        quant_type=QuantType.parse(options.quant_type, "--quant-type"),
        double_quant=options.double_quant,
        quant_blocksize=options.quant_blocksize,
        loralib=loralib_settings(options.rank, options.alpha, options.enable_lora),
        recipe=_combine_recipe(options),
        unmerge=options.unmerge,
        overwrite=options.overwrite,
        quiet=options.quiet,
        resume=options.resume,
        allow_nonfinite=options.allow_nonfinite,
        verify=options.verify,
        hash_inputs=options.hash_inputs,
        push_to_hub=options.push_to_hub,
        private=options.private,
        hub_revision=options.hub_revision,
        command=options.command,
        low_disk=options.low_disk,
        part=parse_part(options.part),
        threads=check_thread_count(options.threads),
    )
    _refuse_conflicts(settings)
    return settings


def _combine_recipe(options: MergeOptions) -> CombineRecipe | None:
    """The checked combination, or None for one adapter merged as it is."""
    if not options.combines:
        return None
    return build_combine_recipe(
        len(options.adapters),
        combine=options.combine,
        weights=options.weights,
        density=options.density,
        majority_sign_method=options.majority_sign_method,
        svd_rank=options.svd_rank,
        svd_clamp=options.svd_clamp,
        seed=options.seed,
    )


def _refuse_conflicts(settings: MergeSettings) -> None:
    """Options that contradict each other, or that the run would ignore without saying so.

    Raises:
        UsageError: the first conflict found.
    """
    one_adapter_only = settings.loralib is not None or settings.unmerge
    if settings.recipe is not None and one_adapter_only:
        raise UsageError(
            "--unmerge and loralib checkpoints (--rank/--alpha) take one adapter and no "
            "--combine options; combine the adapters first, then unmerge the combination"
        )
    lora = settings.save_method is SaveMethod.LORA
    if lora:
        _refuse_with_adapter_output(settings, one_adapter_only)
    refuse_with_part(settings.part, lora, settings.push_to_hub, settings.low_disk)
    if settings.double_quant and settings.save_method is not SaveMethod.MERGED_4BIT:
        raise UsageError("--double-quant applies only with --save-method merged_4bit")
    check_hub_options(
        settings.push_to_hub,
        private=settings.private,
        revision=settings.hub_revision,
        low_disk=settings.low_disk,
        verify=settings.verify,
        adapter_output=lora,
    )


def _refuse_with_adapter_output(settings: MergeSettings, one_adapter_only: bool) -> None:
    """``--save-method lora`` writes one PEFT adapter as it is: refuse what it cannot honour."""
    if settings.recipe is not None:
        raise UsageError(
            "--save-method lora writes one adapter as it is; it cannot be combined with "
            "several adapters or --combine options (merge them into a model instead)"
        )
    if one_adapter_only:
        raise UsageError(
            "--save-method lora writes a PEFT adapter as it is; it cannot be used with "
            "--unmerge or a loralib checkpoint (--rank/--alpha)"
        )
    ignored = [
        name
        for name, given in (
            ("--dtype", settings.output_dtype is not None),
            ("--verify", settings.verify),
            ("--allow-nonfinite", settings.allow_nonfinite),
        )
        if given
    ]
    if ignored:
        raise UsageError(
            f"{' and '.join(ignored)} apply to a merged model; --save-method lora writes "
            "the adapter's tensors as they are: leave them out"
        )
