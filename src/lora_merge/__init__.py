"""lora-merge: merge a LoRA adapter into its base model as a stream.

Python API::

    from lora_merge import MergeOptions, merge

    summary = merge(MergeOptions(base="./base", adapter="./adapter", out="./merged"))

``import lora_merge`` does not import torch: :func:`merge` and :class:`MergeSummary`
come from :mod:`lora_merge.api`, which is imported the first time one of them is
looked up (PEP 562), so that a program that only builds options or handles errors
starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_merge._version import __version__
from lora_merge.errors import (
    AdapterMismatchError,
    InputNotFoundError,
    InvalidInputError,
    LoraMergeError,
    OutputError,
    UsageError,
)
from lora_merge.options import MergeOptions

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports them on first use
    from lora_merge.api import MergeSummary, merge

__all__ = [
    "AdapterMismatchError",
    "InputNotFoundError",
    "InvalidInputError",
    "LoraMergeError",
    "MergeOptions",
    "MergeSummary",
    "OutputError",
    "UsageError",
    "__version__",
    "merge",
]

# Names that lora_merge.api provides, and with it torch.
_FROM_API = ("MergeSummary", "merge")


def __getattr__(name: str) -> Any:
    """``lora_merge.merge`` and ``lora_merge.MergeSummary``, imported on first use (PEP 562)."""
    if name in _FROM_API:
        from lora_merge import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups do not come back here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_API})
