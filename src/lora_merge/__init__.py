"""lora-merge: merge a LoRA adapter into its base model as a stream.

Python API::

    from lora_merge import MergeOptions, merge

    summary = merge(MergeOptions(base="./base", adapter="./adapter", out="./merged"))
"""

from importlib.metadata import PackageNotFoundError, version

from lora_merge.api import MergeSummary, merge
from lora_merge.errors import (
    AdapterMismatchError,
    InputNotFoundError,
    InvalidInputError,
    LoraMergeError,
    OutputError,
)
from lora_merge.options import MergeOptions

try:
    __version__ = version("lora-merge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AdapterMismatchError",
    "InputNotFoundError",
    "InvalidInputError",
    "LoraMergeError",
    "MergeOptions",
    "MergeSummary",
    "OutputError",
    "__version__",
    "merge",
]
