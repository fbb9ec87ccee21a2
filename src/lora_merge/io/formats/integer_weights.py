"""What the integer formats (compressed-tensors INT, GPTQ, AWQ) share: checks and refusals.

Their arithmetic lives in :mod:`lora_merge.compute.integer_dequantize`; each
format module says how its tensors are laid out.
"""

from __future__ import annotations

import torch

from lora_merge.errors import InvalidInputError

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_finite_scales(scales: torch.Tensor, name: str, method: str) -> None:
    """Refuse NaN or Inf among scales just read (a dequantized weight would carry them).

    Raises:
        InvalidInputError: names the tensor.
    """
    if not bool(torch.isfinite(scales).all()):
        raise InvalidInputError(
            f"BASE tensor {name!r} holds NaN or Inf scales: the {method} checkpoint is "
            "corrupt (re-download it)"
        )


def refuse_native_integer(method: str) -> InvalidInputError:
    """Why ``--save-method merged_native`` is refused for an integer base, and what to do."""
    return InvalidInputError(
        f"--save-method merged_native cannot write a {method} base back: re-quantizing "
        "INT4/INT8 weights well needs calibration data (GPTQ/AWQ-style error correction), "
        "which a merge does not have. Merge to 16-bit (the default, merged_16bit) and "
        "quantize that output with llm-compressor (W4A16/W8A16 recipes)"
    )


def bad_scales(name: str, shape: tuple[int, ...], expected: str, method: str) -> InvalidInputError:
    """A scale (or zero-point) tensor whose shape does not fit its weight and group size."""
    return InvalidInputError(
        f"BASE tensor {name!r} has shape {shape}, but its weight needs {expected}: the "
        f"scales do not fit the group size (config.json quantization_config); the {method} "
        "checkpoint is inconsistent"
    )


def missing_part(name: str, weight: str, method: str) -> InvalidInputError:
    """A quantized weight without one of its tensors."""
    return InvalidInputError(
        f"BASE has the {method} weight {weight!r} but no {name!r}; the checkpoint is "
        "incomplete (re-download it)"
    )
