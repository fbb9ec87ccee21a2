"""``--recompute-initial``: B0 and A0 recomputed from BASE, weight by weight.

For ``init_lora_weights="pissa"`` (a full SVD) and ``"olora"`` (a QR) the
initial state is a function of the base weight alone, so it need not have been
saved: :class:`RecomputedInitialState` reads the weight a LoRA module belongs
to, whole, and recomputes its B0 and A0 as PEFT did
(:mod:`lora_merge.compute.initial_factors`), for
:class:`~lora_merge.adapter.initial_state.AdapterMinusInitial` to subtract.
Each thread keeps the last module's factors (A is read, then B), so memory is one
weight in float32 and its decomposition per thread. The other initialisations
are refused before (:func:`~lora_merge.adapter.refusals.refuse_unconverted_initialisation`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from lora_merge.compute.initial_factors import olora_initial_factors, pissa_initial_factors
from lora_merge.dtypes import F32, DType
from lora_merge.errors import InvalidInputError
from lora_merge.io.reader import TensorSource


@dataclass(frozen=True)
class RecomputeTarget:
    """What recomputing one module's initial state needs.

    Attributes:
        weight_key: the base weight the module adapts.
        rank: the module's r (the trained adapter's A rows).
        scale: its scaling (PiSSA divides the singular values by it).
        transposed: the weight is stored (in, out) (Conv1D; PEFT's PiSSA transposes it).
    """

    weight_key: str
    rank: int
    scale: float
    transposed: bool


class RecomputedInitialState:
    """B0 and A0 of each module recomputed from BASE (an ``InitialState``).

    Args:
        method: ``init_lora_weights``: ``"pissa"`` or ``"olora"``.
        base: the base's reader (unquantized weights).
    """

    def __init__(self, method: str, base: TensorSource) -> None:
        self._method = method.lower()
        self._base = base
        self._targets: dict[str, tuple[RecomputeTarget, int]] = {}
        self._local = threading.local()

    def add_target(self, a_key: str, b_key: str, target: RecomputeTarget) -> None:
        """Recompute the factors of the module whose A and B are ``a_key`` and ``b_key``.

        Raises:
            InvalidInputError: an OLoRA module on a Conv1D weight (PEFT's olora_init
                decomposes the stored (in, out) weight, whose factors fit no LoRA of it).
        """
        if target.transposed and self._method == "olora":
            raise InvalidInputError(
                f"--recompute-initial cannot recompute OLoRA's initial state of {a_key!r}: "
                f"{target.weight_key} is stored (in, out) (Conv1D); pass the adapter as "
                "initialised with --initial-adapter DIR"
            )
        self._targets[a_key] = (target, 0)
        self._targets[b_key] = (target, 1)

    def initial_factor(self, key: str) -> torch.Tensor:
        target, which = self._targets[key]
        if getattr(self._local, "weight_key", None) != target.weight_key:
            self._local.factors = None  # let the last module's go first
            self._local.factors = self._recompute(target)
            self._local.weight_key = target.weight_key
        factors: tuple[torch.Tensor, torch.Tensor] = self._local.factors
        return factors[which]

    def initial_dtype(self, key: str) -> DType:
        """PEFT decomposes in float32."""
        return F32

    def _recompute(self, target: RecomputeTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """(A0, B0) of one module."""
        weight = self._base.read_rows(target.weight_key)
        if self._method == "olora":
            b0, a0 = olora_initial_factors(weight, target.rank)
        else:
            weight = weight.T if target.transposed else weight  # PEFT: transpose(W, fan_in_fan_out)
            b0, a0 = pissa_initial_factors(weight, target.rank, target.scale)
        return a0, b0
