"""lora-merge: merge a LoRA adapter into its base model as a stream.

Python API::

    from lora_merge import MergeOptions, merge

    summary = merge(MergeOptions(base="./base", adapter="./adapter", out="./merged"))
"""

from lora_merge._version import __version__
from lora_merge.api import MergeSummary, merge
from lora_merge.errors import (
    AdapterMismatchError,
    InputNotFoundError,
    InvalidInputError,
    LoraMergeError,
    OutputError,
    UsageError,
)
from lora_merge.options import MergeOptions

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
