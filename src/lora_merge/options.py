"""The options of a merge, shared by the CLI and the Python API."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_merge.errors import InvalidInputError

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
        InvalidInputError: the text is not a positive size.
    """
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_PATTERN.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise InvalidInputError(
                f"size {value!r} is not understood: write a number of bytes or a number "
                "with a unit (KB, MB, GB, KiB, MiB, GiB), e.g. 500MB or 2GiB"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise InvalidInputError(f"size {value!r} must be larger than zero")
    return size


def parse_dtype(name: str) -> torch.dtype | None:
    """Return the torch dtype for a ``--dtype`` name, or None for ``auto``."""
    key = name.strip().lower()
    if key == "auto":
        return None
    if key not in DTYPE_BY_NAME:
        raise InvalidInputError(f"dtype {name!r} is not one of auto, bf16, fp16, fp32")
    return DTYPE_BY_NAME[key]


# --save-method values (Unsloth's names). merged_16bit: a plain model, quantized
# weights dequantized; merged_4bit: re-quantized with bitsandbytes; lora: the adapter only.
SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
QUANT_TYPES = ("nf4", "fp4")


def parse_save_method(name: str) -> str:
    """Check a ``--save-method`` value; return it normalised."""
    key = name.strip().lower()
    if key not in SAVE_METHODS:
        raise InvalidInputError(f"save method {name!r} is not one of {', '.join(SAVE_METHODS)}")
    return key


def parse_quant_type(name: str) -> str:
    """Check a ``--quant-type`` value (``nf4`` or ``fp4``); return it normalised."""
    key = name.strip().lower()
    if key not in QUANT_TYPES:
        raise InvalidInputError(f"quant type {name!r} is not one of {', '.join(QUANT_TYPES)}")
    return key


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
