"""lora-merge: merge a LoRA adapter into its base model as a stream.

Python API::

    from lora_merge import MergeOptions, merge

    summary = merge(MergeOptions(base="./base", adapter="./adapter", out="./merged"))

``import lora_merge`` does not import torch: :func:`merge` and :class:`MergeSummary`
come from :mod:`lora_merge.api`, which is imported the first time one of them is
looked up (PEP 562), so that a program that only builds options or handles errors
starts fast. ``__version__`` is read from the package metadata on first use too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    from lora_merge._version import __version__
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

# Names imported on first use: lora_merge.api imports torch (about 1.7 s), and the
# version is read from the package metadata (importlib.metadata: about 0.03 s).
_LAZY = {
    "MergeSummary": "lora_merge.api",
    "merge": "lora_merge.api",
    "__version__": "lora_merge._version",
}


def __getattr__(name: str) -> Any:
    """``merge``, ``MergeSummary`` and ``__version__``, imported on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups do not come back here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
