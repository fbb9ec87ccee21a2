"""The options of a merge, one owner: their values, the settings the run reads, and their check.

- :mod:`~lora_merge.options.values`: each option's type (enums, sizes, device, ``--part``);
- :mod:`~lora_merge.options.settings`: :class:`MergeOptions` (what a caller writes)
  and :class:`MergeSettings` (what the run reads);
- :mod:`~lora_merge.options.checks`: :func:`checked_options`, the one place the
  options are parsed and their conflicts refused (exit 2).
"""

from lora_merge.options.checks import checked_options
from lora_merge.options.settings import MergeOptions, MergeSettings
from lora_merge.options.values import (
    Choice,
    OutputDtype,
    Part,
    QuantType,
    SaveMethod,
    parse_part,
    parse_size,
    resolve_device,
)

__all__ = [
    "Choice",
    "MergeOptions",
    "MergeSettings",
    "OutputDtype",
    "Part",
    "QuantType",
    "SaveMethod",
    "checked_options",
    "parse_part",
    "parse_size",
    "resolve_device",
]
