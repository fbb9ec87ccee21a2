"""The one module that imports bitsandbytes, lazily, and only when a quantized base needs it.

Everything else in lora-merge runs without bitsandbytes. Dequantization asks
:func:`load_bitsandbytes` first and falls back to the pure-torch functions of
:mod:`lora_merge.compute.dequantize` (bit-identical, tested) when it returns
None; re-quantization (``--save-method merged_4bit``) needs bitsandbytes and
says so when it is missing.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from lora_merge.errors import InvalidInputError


@functools.cache
def load_bitsandbytes() -> ModuleType | None:
    """``bitsandbytes.functional``, or None when bitsandbytes is not installed or fails to load."""
    # On import, bitsandbytes' CPU backend logs a warning when the optional `kernels`
    # package (a faster CPU matmul for inference) is missing; a merge never uses it,
    # and stderr is for our own messages.
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    except Exception:  # ImportError, or a broken native library raising anything at import
        return None
    finally:
        bnb_logger.setLevel(level)
    return functional


def dequantize_4bit_with_bitsandbytes(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    count: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """bitsandbytes' own ``dequantize_4bit`` over a block-aligned run of elements, 1-D.

    Same arguments as :func:`lora_merge.compute.dequantize.dequantize_4bit`
    (``absmax`` already float32: nested absmax is dequantized first). Returns
    None when bitsandbytes is unavailable or has no kernel for the device.
    """
    functional = load_bitsandbytes()
    if functional is None:
        return None
    state = functional.QuantState(
        absmax=absmax.float(),
        shape=torch.Size([count]),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
    )
    try:
        # (bytes, 1): the layout transformers stores; a leading dimension of 1
        # would make bitsandbytes transpose the result.
        out = functional.dequantize_4bit(packed.reshape(-1, 1), quant_state=state)
    except (NotImplementedError, RuntimeError):  # no kernel for this device or build
        return None
    return out.reshape(-1)


def dequantize_nested_absmax_with_bitsandbytes(
    quantized_absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int,
    offset: float,
) -> torch.Tensor | None:
    """bitsandbytes' ``dequantize_blockwise`` plus the offset, as its ``dequantize_4bit`` does."""
    functional = load_bitsandbytes()
    if functional is None:
        return None
    try:
        absmax = functional.dequantize_blockwise(
            quantized_absmax.reshape(-1),
            absmax=nested_absmax.float(),
            code=nested_code,
            blocksize=nested_blocksize,
        )
    except (NotImplementedError, RuntimeError):
        return None
    absmax += torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    return absmax.float()


def dequantize_int8_with_bitsandbytes(
    weight_rows: torch.Tensor, row_scales: torch.Tensor
) -> torch.Tensor | None:
    """bitsandbytes' ``int8_vectorwise_dequant``, or None without bitsandbytes."""
    functional = load_bitsandbytes()
    if functional is None:
        return None
    try:
        return functional.int8_vectorwise_dequant(weight_rows, row_scales.float())
    except (NotImplementedError, RuntimeError):
        return None


def quantize_4bit_with_bitsandbytes(
    values: torch.Tensor, quant_type: str, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 codes (``(n + 1) // 2`` bytes) and float32 absmax of a 1-D run of weights.

    The run must start on a block boundary; each block is quantized on its own,
    so a tensor quantized run by run gets the bytes it would get whole.

    Raises:
        InvalidInputError: bitsandbytes is not installed (``merged_4bit`` needs it).
    """
    functional = load_bitsandbytes()
    if functional is None:
        raise InvalidInputError(
            "--save-method merged_4bit re-quantizes with bitsandbytes, which is not installed "
            "or does not load here: pip install bitsandbytes, or use merged_16bit"
        )
    packed, state = functional.quantize_4bit(
        values.reshape(-1), blocksize=blocksize, quant_type=quant_type
    )
    return packed.reshape(-1).view(torch.uint8), state.absmax.float().reshape(-1)


def quantize_absmax_with_bitsandbytes(
    absmax: torch.Tensor, nested_blocksize: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Double quantization of a whole tensor's absmax, as bitsandbytes' ``quantize_4bit`` does it.

    Returns:
        The uint8 codes, the float32 nested absmax, the 256-entry nested code, and the offset.
    """
    functional = load_bitsandbytes()
    if functional is None:
        raise InvalidInputError(
            "--save-method merged_4bit with double quantization needs bitsandbytes: "
            "pip install bitsandbytes"
        )
    offset = absmax.mean()  # bitsandbytes: offset = _absmax.mean(); over the whole tensor
    codes, state = functional.quantize_blockwise(absmax - offset, blocksize=nested_blocksize)
    return codes.reshape(-1), state.absmax.float(), state.code.float(), float(offset.item())
