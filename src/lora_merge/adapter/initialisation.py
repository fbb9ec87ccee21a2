"""LoRA initialisations that change the base weights as well as the adapter.

PEFT's PiSSA, OLoRA, CorDA and LoRA-GA (``peft/tuners/lora/layer.py``:
``pissa_init``, ``olora_init``, ``corda_init``, ``lora_ga_init``) start the
adapter at ``B0, A0`` taken from the weight and train against the *residual*
``W_res = W - s·B0·A0``; LoftQ (``loftq_init``) replaces W by a quantized ``Q``.
An adapter trained so, merged as it is into the original W, gives
``W + s·B·A``: the initial components counted twice (PiSSA, ...) or an error
``W - Q`` left in (LoftQ). PEFT's fix is its conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``, which
writes ``[A; A0]`` and ``[B, -B0]`` with r and lora_alpha doubled,
``LoraModel.subtract_mutated_init``): the converted adapter has
``init_lora_weights: true`` and merges normally.

Here is what marks an unconverted adapter (``init_lora_weights`` as a string,
or a ``loftq_config``) and what lora-merge can do about each
(:class:`InitialStateMode`). ``"eva"``, ``"orthogonal"``, ``"mica"`` and
``"gaussian"`` leave the base untouched and merge normally.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.errors import UsageError

# init_lora_weights values PEFT 0.21 knows that leave the base weights as they are.
BASE_PRESERVING_INITIALISATIONS = ("gaussian", "eva", "orthogonal", "mica")


class InitialStateMode(str, Enum):
    """How a merge treats an adapter whose initialisation changed the base.

    ``as_trained``: a plain merge, refused for such an adapter.
    ``initial_adapter``: subtract the initial state read from ``--initial-adapter DIR``.
    ``residual_base``: BASE already is what the adapter trained against (``--residual-base``).
    ``recompute``: recompute the initial state from BASE (``--recompute-initial``).
    """

    AS_TRAINED = "as_trained"
    INITIAL_ADAPTER = "initial_adapter"
    RESIDUAL_BASE = "residual_base"
    RECOMPUTE = "recompute"


# The option that asks for each mode, for messages.
MODE_OPTIONS = {
    InitialStateMode.INITIAL_ADAPTER: "--initial-adapter",
    InitialStateMode.RESIDUAL_BASE: "--residual-base",
    InitialStateMode.RECOMPUTE: "--recompute-initial",
}


def initial_state_mode(
    initial_adapter: object, residual_base: bool, recompute_initial: bool
) -> InitialStateMode:
    """The one way of handling a base-changing initialisation the options ask for.

    Raises:
        UsageError: more than one is asked for.
    """
    asked = [
        mode
        for mode, given in (
            (InitialStateMode.INITIAL_ADAPTER, initial_adapter is not None),
            (InitialStateMode.RESIDUAL_BASE, residual_base),
            (InitialStateMode.RECOMPUTE, recompute_initial),
        )
        if given
    ]
    if len(asked) > 1:
        raise UsageError(
            f"{' and '.join(MODE_OPTIONS[mode] for mode in asked)} are different answers to "
            "one question (what the adapter was trained against): give one of them"
        )
    return asked[0] if asked else InitialStateMode.AS_TRAINED


def refuse_with_initial_state(
    mode: InitialStateMode, several_adapters: bool, adapter_as_is: bool
) -> None:
    """``--initial-adapter`` and ``--recompute-initial`` change one PEFT adapter's product in a
    merge: refuse them with a combination, a loralib file or ``--save-method lora``.

    Raises:
        UsageError: one of those.
    """
    if mode in (InitialStateMode.INITIAL_ADAPTER, InitialStateMode.RECOMPUTE) and (
        several_adapters or adapter_as_is
    ):
        raise UsageError(
            f"{MODE_OPTIONS[mode]} subtracts one PEFT adapter's initial state from it in a "
            "merge; it cannot be used with several adapters, --combine options, a loralib "
            "checkpoint or --save-method lora"
        )


@dataclass(frozen=True)
class BaseChangingInitialisation:
    """One initialisation that trained the adapter against other weights than BASE's.

    Attributes:
        value: ``init_lora_weights`` as the config has it (``"pissa_niter_4"``).
        name: how its paper names it (``PiSSA``).
        trained_against: what the adapter was trained against, for messages.
        not_recomputable: why the initial state cannot be recomputed from BASE,
            or None when it can (``"pissa"``: a full SVD; ``"olora"``: a QR).
        subtractable: whether ``s·(B·A - B0·A0)`` is the update (False for LoftQ,
            whose ``Q + s·B0·A0`` only approximates W).
    """

    value: str
    name: str
    trained_against: str
    not_recomputable: str | None
    subtractable: bool = True

    @property
    def recomputable(self) -> bool:
        return self.not_recomputable is None


_RESIDUAL = "the residual model W - scale * B0 @ A0"


def base_changing_initialisation(config: LoraAdapterConfig) -> BaseChangingInitialisation | None:
    """The initialisation that makes this adapter unmergeable as it is, or None.

    Reproduces the dispatch of PEFT's ``LoraLayer.update_layer``: a string starting
    with ``pissa`` or ``corda``, ``olora`` in any case, ``lora_ga`` and ``loftq``
    (or a non-empty ``loftq_config``).
    """
    value = config.init_lora_weights
    if config.loftq or value == "loftq":
        return BaseChangingInitialisation(
            "loftq",
            "LoftQ",
            "LoftQ's quantized backbone Q (PEFT's loftq_init replaces each weight by it)",
            "its Q is the backbone LoftQ saved beside the adapter: pass that as BASE",
            subtractable=False,
        )
    if not isinstance(value, str):
        return None
    if value == "pissa":
        return BaseChangingInitialisation(value, "PiSSA", _RESIDUAL, None)
    if value.startswith("pissa"):
        return BaseChangingInitialisation(
            value,
            "PiSSA (fast SVD)",
            _RESIDUAL,
            "its randomized SVD (torch.svd_lowrank) drew from a random generator whose state "
            "the adapter does not record",
        )
    if value.lower() == "olora":
        return BaseChangingInitialisation(value, "OLoRA", _RESIDUAL, None)
    if value.startswith("corda"):
        return BaseChangingInitialisation(
            value,
            "CorDA",
            _RESIDUAL,
            "its B0 and A0 come from activation covariances of calibration data the adapter "
            "does not hold",
        )
    if value == "lora_ga":
        return BaseChangingInitialisation(
            value,
            "LoRA-GA",
            _RESIDUAL,
            "its B0 and A0 come from gradients on training batches the adapter does not hold",
        )
    return None


def is_unknown_initialisation(config: LoraAdapterConfig) -> bool:
    """A string ``init_lora_weights`` this version does not know (a newer PEFT's, maybe)."""
    value = config.init_lora_weights
    return (
        isinstance(value, str)
        and value not in BASE_PRESERVING_INITIALISATIONS
        and base_changing_initialisation(config) is None
    )


def describe_initial_state(mode: InitialStateMode, config: LoraAdapterConfig) -> str | None:
    """The model card's words for how the initial state was handled, or None for a plain merge."""
    initialisation = base_changing_initialisation(config)
    if initialisation is None or mode is InitialStateMode.AS_TRAINED:
        return None
    name = initialisation.name
    if mode is InitialStateMode.RESIDUAL_BASE:
        return f"{name} adapter merged into BASE as given: {initialisation.trained_against}"
    source = (
        "the initial adapter given with --initial-adapter"
        if mode is InitialStateMode.INITIAL_ADAPTER
        else "recomputed from BASE (--recompute-initial)"
    )
    return (
        f"{name} adapter: B @ A is B @ A - B0 @ A0, the initial state B0, A0 {source}, "
        "subtracted (PEFT's path_initial_model_for_weight_conversion)"
    )
