"""An adapter with its initial state subtracted, seen as one plain adapter.

PiSSA, OLoRA, CorDA and LoRA-GA train against ``W_res = W - s·B0·A0`` (see
:mod:`lora_merge.adapter.initialisation`), so the update to the original W is
``s·(B·A - B0·A0)``. PEFT's conversion (``LoraModel.subtract_mutated_init``)
writes it as one LoRA of rank 2r: ``A' = [A; A0]`` (rows) and ``B' = [B, -B0]``
(columns), whose product is ``B·A - B0·A0`` exactly. :class:`AdapterMinusInitial`
is a ``TensorSource`` that gives the planner and the stream those A' and B',
concatenated in PEFT's order, so the merge computes PEFT's ``W + s·(B'·A')`` in
the same stream, with the same one rounding, and is the same bits as PEFT
merging its converted adapter. Negation and concatenation are exact; the scale
is the adapter's own (:class:`InitialDifferenceConfig`), where PEFT's converted
config doubles r and alpha (the same number, except with rsLoRA, where
``alpha·√2 / √(2r)`` may differ from ``alpha / √r`` in the last bit: the trained
model used the latter).

The initial state comes from the adapter saved at initialisation
(``--initial-adapter DIR``, :class:`SavedInitialState`) or is recomputed from
BASE (``--recompute-initial``, :mod:`lora_merge.adapter.recomputed_initial`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents
from lora_merge.dtypes import F32, DType, dtype_of
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.io.reader import TensorSource


class InitialState(Protocol):
    """Where B0 and A0 of each module come from."""

    def initial_factor(self, key: str) -> torch.Tensor:
        """A0 (for an A key) or B0 (for a B key) of the trained adapter's key, whole."""
        ...

    def initial_dtype(self, key: str) -> DType:
        """The dtype :meth:`initial_factor` gives for ``key``."""
        ...


@dataclass(frozen=True)
class InitialDifferenceConfig(LoraAdapterConfig):
    """The config of ``[A; A0]``, ``[B, -B0]``: the trained adapter's scale at half the rank."""

    def scale_for(self, module_name: str, rank: int) -> float:
        return super().scale_for(module_name, rank // 2)

    @classmethod
    def of(cls, config: LoraAdapterConfig) -> InitialDifferenceConfig:
        return cls(**{f.name: getattr(config, f.name) for f in fields(LoraAdapterConfig)})


class SavedInitialState:
    """B0 and A0 read from the adapter PEFT saved at initialisation (``--initial-adapter``).

    Args:
        label: how messages name it (its folder).
        source: its tensors.
    """

    def __init__(self, label: str, source: TensorSource) -> None:
        self._label = label
        self._source = source
        self._keys = set(source.keys())

    def initial_factor(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise AdapterMismatchError(
                f"--initial-adapter {self._label} has no {key!r}, which the adapter has: was "
                "it saved from the same adapter, before training?"
            )
        return self._source.read_rows(key)

    def initial_dtype(self, key: str) -> DType:
        return self._source.dtype(key) if key in self._keys else F32


class AdapterMinusInitial:
    """The trained adapter with B0·A0 subtracted, as PEFT's converted adapter (a ``TensorSource``).

    Every LoRA module's A and B are ``[A; A0]`` and ``[B, -B0]``; every other
    tensor (modules_to_save, trainable tokens, biases) is the trained adapter's.

    Args:
        trained: the trained adapter's tensors.
        contents: its keys, sorted by role.
        initial: where B0 and A0 come from.
    """

    def __init__(
        self, trained: TensorSource, contents: AdapterContents, initial: InitialState
    ) -> None:
        self._trained = trained
        self._initial = initial
        self._a_keys: set[str] = set()
        self._b_keys: set[str] = set()
        for module in contents.lora_modules.values():
            if module.a_key is not None and module.b_key is not None:
                self._a_keys.add(module.a_key)
                self._b_keys.add(module.b_key)

    def keys(self) -> Iterable[str]:
        return self._trained.keys()

    def close(self) -> None:
        """The trained and initial adapters are closed by whoever opened them."""

    def working_bytes(self, key: str) -> int:
        """Not counted (0), as before the reader protocol said it: [A; A0] and [B, -B0] are
        made whole when read, beside the trained factors."""
        return 0

    def held_bytes(self, workers: int) -> int:
        """Not counted (0), as before: the trained adapter's own is not passed on either."""
        return 0

    def dtype(self, key: str) -> DType:
        if key in self._a_keys or key in self._b_keys:  # torch.cat promotes, as in PEFT's
            trained, initial = self._trained.dtype(key), self._initial.initial_dtype(key)
            return dtype_of(torch.promote_types(trained.torch, initial.torch))
        return self._trained.dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self._trained.shape(key)
        if key in self._a_keys:  # [A; A0]: twice the rows
            return (2 * shape[0], *shape[1:])
        if key in self._b_keys:  # [B, -B0]: twice the columns
            return (shape[0], 2 * shape[1], *shape[2:])
        return shape

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        if key not in self._a_keys and key not in self._b_keys:
            return self._trained.read_rows(key, start, stop, buffer)
        trained = self._trained.read_rows(key)
        initial = self._initial.initial_factor(key)
        if initial.shape != trained.shape:
            raise AdapterMismatchError(
                f"the initial state of {key!r} has shape {tuple(initial.shape)} but the "
                f"adapter's is {tuple(trained.shape)}: the initial adapter must be the same "
                "adapter (targets and ranks) saved before training"
            )
        # PEFT's subtract_mutated_init: cat([A, A0], dim=0) and cat([B, -B0], dim=1), in
        # the promoted dtype of the two (exact: both widen to it).
        if key in self._a_keys:
            both = torch.cat((trained, initial), dim=0)
        else:
            both = torch.cat((trained, -initial), dim=1)
        return both[start:stop]


def check_initial_adapter_config(
    config_path: Path | None,
    config: LoraAdapterConfig,
    initial_path: Path | None,
    initial: LoraAdapterConfig,
) -> None:
    """The initial adapter must be the trained one's start: same ranks, scales and method.

    PEFT's own practice saves the initial adapter with ``init_lora_weights`` set to
    ``true`` (so that loading it does not initialise again), and some training
    scripts set it on the trained adapter too: ``true`` on either side matches.

    Raises:
        InvalidInputError: the two configs differ in a field that decides the product.
    """
    if initial_path is None:
        raise InvalidInputError("--initial-adapter must be a PEFT adapter folder with its config")
    for name in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora"):
        mine, theirs = getattr(config, name), getattr(initial, name)
        if mine != theirs:
            raise InvalidInputError(
                f"--initial-adapter {initial_path} has {name}={theirs!r} but {config_path} "
                f"has {mine!r}: the initial adapter must be this adapter saved before training"
            )
    methods = {config.init_lora_weights, initial.init_lora_weights} - {True}
    if len(methods) > 1:
        raise InvalidInputError(
            f"--initial-adapter {initial_path} has init_lora_weights="
            f"{initial.init_lora_weights!r} but {config_path} has "
            f"{config.init_lora_weights!r}: the initial adapter must be this adapter saved "
            "before training"
        )


def check_same_modules(label: str, contents: AdapterContents, initial: AdapterContents) -> None:
    """Both adapters target the same modules (shapes are checked as they are read).

    Raises:
        AdapterMismatchError: a module one has and the other has not.
    """
    mine, theirs = set(contents.lora_modules), set(initial.lora_modules)
    if mine != theirs:
        missing = sorted(mine ^ theirs)[0]
        side = "the adapter" if missing in mine else f"--initial-adapter {label}"
        raise AdapterMismatchError(
            f"module {missing!r} is in {side} only: the initial adapter must target the same "
            "modules (it is the adapter saved before training)"
        )
