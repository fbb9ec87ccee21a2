"""The values of a merge's options: each one's type, parsed from what the user typed.

Choices are enums (:class:`OutputDtype`, :class:`SaveMethod`, :class:`QuantType`),
sizes are byte counts (:func:`parse_size`), the device is a ``torch.device``
(:func:`resolve_device`) and ``--part I/N`` is a :class:`Part`. Every value
keeps its type from here to the end of the run: nothing turns one back into text.
This module imports nothing of the project but its errors and dtypes, so every
room of the run may name these types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

from lora_merge.dtypes import BF16, F16, F32, DType
from lora_merge.errors import UsageError

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
    def dtype(self) -> DType | None:
        """The dtype every floating-point tensor is written in; None for ``auto``."""
        if self is OutputDtype.AUTO:
            return None
        return {"bf16": BF16, "fp16": F16, "fp32": F32}[self.value]


# torch's own names mean the same as the short ones.
# torch's own names mean the same as the short ones.
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class SaveMethod(Choice):
    """``--save-method`` (Unsloth's names): what OUT holds."""

    MERGED_16BIT = "merged_16bit"  # a plain model; quantized weights are dequantized
    MERGED_4BIT = "merged_4bit"  # the merged weights re-quantized with bitsandbytes
    MERGED_NATIVE = "merged_native"  # the merged weights re-quantized in BASE's own format
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


def parse_threads(threads: object) -> int | None:
    """``--threads``: a whole number of at least 1, or None for the CPUs the process may use.

    Raises:
        UsageError: anything else.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"--threads {threads!r} must be a whole number of at least 1")
    return threads


def resolve_device(name: object) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; others as given (any case).

    Raises:
        UsageError: the name is not a device, or CUDA is asked for but absent.
    """
    import torch

    key = name.strip().lower() if isinstance(name, str) else repr(name)
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
class Part:
    """Part ``index`` of ``count`` (``--part index/count``), 0 <= index < count."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str | None) -> Part | None:
    """``"1/3"`` -> ``Part(1, 3)``; None stays None.

    Raises:
        UsageError: not two whole numbers ``I/N`` with ``0 <= I < N``.
    """
    if text is None:
        return None
    matched = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if matched is None:
        raise UsageError(
            f"--part {text!r} is not I/N: give this part's number I and the number of "
            "parts N, e.g. --part 0/4 ... --part 3/4"
        )
    index, count = int(matched[1]), int(matched[2])
    if count < 1 or index >= count:
        raise UsageError(
            f"--part {text!r}: the part number must be from 0 to N-1 "
            f"({'0 to ' + str(count - 1) if count else 'N must be at least 1'})"
        )
    return Part(index, count)
