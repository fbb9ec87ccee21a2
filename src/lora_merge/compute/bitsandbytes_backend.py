"""The one module that imports bitsandbytes, lazily, and only when a quantized base needs it.

Everything else in lora-merge runs without bitsandbytes: a merge dequantizes
with :mod:`lora_merge.compute.dequantize` (the same bits, tested; faster on the
CPU than importing bitsandbytes), so only re-quantization (``--save-method
merged_4bit``) needs it, and :func:`require_bitsandbytes` refuses that run
before any work starts when it is missing. The ``dequantize_*`` functions here
serve ``DequantizingReader(backend="bitsandbytes")``: the tests and benchmarks
that compare the two; where bitsandbytes is unusable they return None (the
caller then uses torch).

bitsandbytes has no wheel for some platforms (Intel Macs, macOS before 14,
Linux on other CPUs), and an installed one can fail to load (a native library
built for another CUDA, a missing system library). Not installed is an ordinary
case and passes in silence; installed but broken is said once, in one warning
line, because the user may want to repair it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from lora_merge.errors import InvalidInputError, LoraMergeWarning

_PACKAGE = "bitsandbytes"
_FALLBACK = "lora-merge dequantizes with its own pure-torch path instead, which gives the same bits"


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message``, for messages that must stay on one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class _Bitsandbytes:
    """bitsandbytes as this process sees it: imported once, by whichever thread asks first.

    The import is process-wide state anyway (``sys.modules``); this keeps what came of it
    (the module, or why there is none) and whether the one warning was issued, under a lock
    because the stream dequantizes on several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._functional: ModuleType | None = None
        self.failure: str | None = None  # why an installed bitsandbytes is unusable
        self._warned = False

    def functional(self) -> ModuleType | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._functional, self.failure = _import_functional()
            return self._functional

    def give_up(self, failure: str) -> None:
        """Stop using bitsandbytes for the rest of the process (it failed when called)."""
        with self._lock:
            self._functional, self.failure = None, failure

    def warn_once(self) -> None:
        """Say in one warning line, once per process, that a broken bitsandbytes is bypassed."""
        with self._lock:
            if self.failure is None or self._warned:
                return
            self._warned = True
            failure = self.failure
        warnings.warn(f"{failure}; {_FALLBACK}", LoraMergeWarning, stacklevel=4)


def _import_functional() -> tuple[ModuleType | None, str | None]:
    """``(bitsandbytes.functional, None)``, or ``(None, why)``; why is None when not installed."""
    # On import, bitsandbytes logs a warning when the optional `kernels` package (a faster
    # CPU matmul for inference) is missing, and an error with a traceback when its native
    # library fails to load; a merge never needs the first, we say the second in one line
    # of our own, and stderr is for our own messages.
    bnb_logger = logging.getLogger(_PACKAGE)
    level = bnb_logger.level
    bnb_logger.setLevel(logging.CRITICAL)
    try:
        import bitsandbytes.functional as functional
    except ModuleNotFoundError as err:
        if err.name == _PACKAGE:  # not installed: ordinary where it has no wheel
            return None, None
        return None, f"bitsandbytes is installed but does not load ({_one_line(err)})"
    except Exception as err:  # a broken native library can raise anything at import
        return None, f"bitsandbytes is installed but does not load ({_one_line(err)})"
    finally:
        bnb_logger.setLevel(level)
    return functional, None


_bitsandbytes = _Bitsandbytes()


def load_bitsandbytes() -> ModuleType | None:
    """``bitsandbytes.functional``, or None when bitsandbytes is not installed or fails to load.

    The first call imports it; any exception from that import (an ``OSError``
    from a native library, a ``RuntimeError`` from its CUDA probe, anything)
    means None, never a crash.
    """
    return _bitsandbytes.functional()


def _for_dequantization() -> ModuleType | None:
    """:func:`load_bitsandbytes`, warning once when an installed bitsandbytes is broken."""
    functional = _bitsandbytes.functional()
    if functional is None:
        _bitsandbytes.warn_once()
    return functional


def require_bitsandbytes(purpose: str) -> ModuleType:
    """``bitsandbytes.functional`` for ``purpose`` (e.g. ``--save-method merged_4bit``).

    The planner calls it, so that a run that needs bitsandbytes is refused
    before any work starts.

    Raises:
        InvalidInputError: bitsandbytes is not installed or does not load here.
    """
    functional = _bitsandbytes.functional()
    if functional is None:
        why = _bitsandbytes.failure or "bitsandbytes is not installed"
        raise InvalidInputError(
            f"{purpose} quantizes with bitsandbytes, and {why}: pip install bitsandbytes "
            "(it has wheels for Linux x86_64/aarch64, Windows and macOS 14+ on Apple silicon), "
            "or use --save-method merged_16bit"
        )
    return functional


def _dequantized_by_bitsandbytes(
    kernel: str, call: Callable[[], torch.Tensor]
) -> torch.Tensor | None:
    """``call()``, or None where bitsandbytes cannot do it (the caller then uses torch)."""
    try:
        return call()
    except NotImplementedError:  # no kernel for this device: ordinary, and the bits agree
        return None
    except Exception as err:  # a native library that loaded but fails when called
        _bitsandbytes.give_up(f"bitsandbytes' {kernel} fails here ({_one_line(err)})")
        _bitsandbytes.warn_once()
        return None


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
    functional = _for_dequantization()
    if functional is None:
        return None
    state = functional.QuantState(
        absmax=absmax.float(),
        shape=torch.Size([count]),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
    )
    out = _dequantized_by_bitsandbytes(
        "dequantize_4bit",
        # (bytes, 1): the layout transformers stores; a leading dimension of 1
        # would make bitsandbytes transpose the result.
        lambda: functional.dequantize_4bit(packed.reshape(-1, 1), quant_state=state),
    )
    return None if out is None else out.reshape(-1)


def dequantize_nested_absmax_with_bitsandbytes(
    quantized_absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int,
    offset: float,
) -> torch.Tensor | None:
    """bitsandbytes' ``dequantize_blockwise`` plus the offset, as its ``dequantize_4bit`` does."""
    functional = _for_dequantization()
    if functional is None:
        return None
    absmax = _dequantized_by_bitsandbytes(
        "dequantize_blockwise",
        lambda: functional.dequantize_blockwise(
            quantized_absmax.reshape(-1),
            absmax=nested_absmax.float(),
            code=nested_code,
            blocksize=nested_blocksize,
        ),
    )
    if absmax is None:
        return None
    absmax += torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    return absmax.float()


def dequantize_int8_with_bitsandbytes(
    weight_rows: torch.Tensor, row_scales: torch.Tensor
) -> torch.Tensor | None:
    """bitsandbytes' ``int8_vectorwise_dequant``, or None without bitsandbytes."""
    functional = _for_dequantization()
    if functional is None:
        return None
    return _dequantized_by_bitsandbytes(
        "int8_vectorwise_dequant",
        lambda: functional.int8_vectorwise_dequant(weight_rows, row_scales.float()),
    )


def quantize_4bit_with_bitsandbytes(
    values: torch.Tensor, quant_type: str, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 codes (``(n + 1) // 2`` bytes) and float32 absmax of a 1-D run of weights.

    The run must start on a block boundary; each block is quantized on its own,
    so a tensor quantized run by run gets the bytes it would get whole.

    Raises:
        InvalidInputError: bitsandbytes is not installed (``merged_4bit`` needs it).
    """
    functional = require_bitsandbytes("--save-method merged_4bit")
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
    functional = require_bitsandbytes("--save-method merged_4bit")
    offset = absmax.mean()  # bitsandbytes: offset = _absmax.mean(); over the whole tensor
    codes, state = functional.quantize_blockwise(absmax - offset, blocksize=nested_blocksize)
    return codes.reshape(-1), state.absmax.float(), state.code.float(), float(offset.item())


def quantize_4bit_whole_with_bitsandbytes(
    values: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, int, float] | None]:
    """bitsandbytes' ``quantize_4bit`` of a whole weight (``--qlora-base``).

    The whole weight, because double quantization subtracts the mean of every
    absmax of the weight before quantizing them.

    Returns:
        The packed uint8 codes; the absmax (float32, or uint8 codes with
        ``double_quant``); and with ``double_quant`` the nested absmax (float32),
        nested codebook (float32), nested blocksize and offset, else None.

    Raises:
        InvalidInputError: bitsandbytes is not installed or does not load here.
    """
    functional = require_bitsandbytes("--qlora-base")
    packed, state = functional.quantize_4bit(
        values.reshape(-1),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    packed = packed.reshape(-1).view(torch.uint8)
    if not double_quant:
        return packed, state.absmax.float().reshape(-1), None
    nested = state.state2
    return (
        packed,
        state.absmax.reshape(-1),
        (nested.absmax.float(), nested.code.float(), nested.blocksize, float(state.offset)),
    )
