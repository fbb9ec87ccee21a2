"""Checkpoints of loralib (microsoft/LoRA): a bare state dict, rank and alpha given by the user.

loralib's ``lora_state_dict(model)`` saves ``X.lora_A`` and ``X.lora_B`` (no
``.weight``, no config); its layers merge, in ``train(False)``, as:

- ``Linear``: ``W += T(B @ A) * alpha / r``, T a transpose when ``fan_in_fan_out``
  (the weight is then stored (in, out), as GPT-2's Conv1D);
- ``Embedding``: A is (r, num_embeddings) and B (dim, r), the other way round from
  Linear: ``W += (B @ A).T * alpha / r``;
- ``MergedLinear`` (a fused qkv with ``enable_lora=[True, False, True]``): A is
  (r·k, in) and B (out/G·k, r) for k enabled of G output groups;
  ``merge_AB`` is a grouped conv1d (enabled group j: ``B[j] @ A[j]``) scattered
  into the enabled groups' rows (``zero_pad``), transposed like Linear.

Shapes say which layer a pair is and how it is laid out; only which groups of a
MergedLinear are enabled cannot be read from shapes when some are not, so that
comes from ``--enable-lora``. ``ConvLoRA`` (weights under ``X.conv.weight``) is
not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.errors import UsageError

_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


@dataclass(frozen=True)
class LoralibSettings:
    """What a loralib checkpoint does not record: the rank, alpha, and MergedLinear's groups.

    Attributes:
        rank: r, as given to every loralib layer.
        alpha: lora_alpha; loralib scales by ``alpha / r``.
        enable_lora: MergedLinear's ``enable_lora``, or None when every group is adapted.
    """

    rank: int
    alpha: float
    enable_lora: tuple[bool, ...] | None = None

    def adapter_config(self) -> LoraAdapterConfig:
        """The equivalent PEFT config (plain ``alpha / r`` scaling, no patterns)."""
        return LoraAdapterConfig(r=self.rank, lora_alpha=self.alpha)


def loralib_settings(
    rank: int | None, alpha: float | None, enable_lora: str | None
) -> LoralibSettings | None:
    """Check ``--rank``, ``--alpha`` and ``--enable-lora``; None when none is given (a PEFT adapter).

    Raises:
        UsageError: one of rank and alpha without the other, values out of range,
            or ``--enable-lora`` without them (the options contradict each other).
    """
    if rank is None and alpha is None:
        if enable_lora is not None:
            raise UsageError(
                "--enable-lora describes a loralib checkpoint: give --rank and --alpha too"
            )
        return None
    if rank is None or alpha is None:
        raise UsageError(
            "a loralib checkpoint needs both --rank and --alpha (its r and lora_alpha); "
            "a PEFT adapter folder needs neither"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UsageError(f"--rank must be a positive integer, got {rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise UsageError(f"--alpha must be a finite number, got {alpha}")
    groups = None if enable_lora is None else parse_enable_lora(enable_lora)
    return LoralibSettings(rank=rank, alpha=float(alpha), enable_lora=groups)


def parse_enable_lora(text: str) -> tuple[bool, ...]:
    """``"1,0,1"`` or ``"true,false,true"`` -> (True, False, True).

    Raises:
        UsageError: an entry is not a boolean, or none is true.
    """
    if not isinstance(text, str):
        raise UsageError(f"--enable-lora {text!r} is not a text such as 1,0,1")
    groups = []
    for part in text.split(","):
        word = part.strip().lower()
        if word not in _TRUE | _FALSE:
            raise UsageError(
                f"--enable-lora {text!r}: {part.strip()!r} is not true/false or 1/0; write "
                "loralib's enable_lora list, e.g. 1,0,1 for q and v of a fused qkv"
            )
        groups.append(word in _TRUE)
    if not any(groups):
        raise UsageError(f"--enable-lora {text!r} enables no group")
    return tuple(groups)


def loralib_adapter_config(loralib: LoralibSettings | None) -> LoraAdapterConfig:
    """The config a loralib checkpoint (no adapter_config.json) is merged with."""
    assert loralib is not None, "a config-less adapter is resolved only with --rank/--alpha"
    return loralib.adapter_config()
