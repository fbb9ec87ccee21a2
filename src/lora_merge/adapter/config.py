"""adapter_config.json: what PEFT records about a LoRA adapter, and its scaling rule."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_merge.adapter.peft_types import MERGED_TYPES, check_peft_type
from lora_merge.errors import InvalidInputError
from lora_merge.io.json_files import read_json_object


@dataclass(frozen=True)
class OftSettings:
    """What an OFT config says about building its rotation R (PEFT's ``OFTConfig``).

    Attributes:
        coft: constrained OFT: each block's generator is projected into a ball of radius
            ``eps`` before the Cayley transform.
        eps: that radius.
        block_share: one block shared by every block of R.
        use_cayley_neumann: the Cayley transform by a truncated Neumann series (PEFT
            0.21's default) rather than a linear solve.
        num_cayley_neumann_terms: the series' terms.
    """

    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The fields of a PEFT ``LoraConfig`` (or AdaLoRA, IA3, LoHa, LoKr config) that decide a merge.

    Attributes:
        r: default rank (the real rank of each LoRA module is read from its A matrix).
        lora_alpha: default alpha (LoHa's and LoKr's ``alpha``; 1 for IA3, which has none).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern: regex -> rank overrides (kept for reporting; shapes are authoritative).
        alpha_pattern: regex -> alpha overrides, first match wins.
        fan_in_fan_out: PEFT's flag for weights stored (in, out), e.g. GPT-2's Conv1D.
        base_model_name_or_path: the base the adapter was trained on, if recorded.
        trainable_token_indices: PEFT's trainable tokens: the rows of the input
            embedding replaced (a list), or module name -> rows (a dict).
        target_parameters: parameter names PEFT put a LoRA on (MoE experts), if any.
        use_dora: PEFT's flag for DoRA (weight-decomposed LoRA); its magnitude
            vectors are in the weights file.
        init_lora_weights: how PEFT initialised A and B: ``True``/``False``, or a
            method's name (``"pissa"``, ``"olora"``, ``"loftq"``...); some of them
            change the base weights too (see :mod:`lora_merge.adapter.initialisation`).
        loftq: the config has a non-empty ``loftq_config`` (LoftQ quantized the base).
        peft_type: ``LORA``, or another type lora-merge merges (see
            :mod:`lora_merge.adapter.peft_types`).
        feedforward_modules: IA3's modules whose vector scales their inputs.
        init_r: AdaLoRA's initial rank: every layer's ``ranknum``, which its delta is
            divided by, pruned or not (AdaLoRA's ``rank_pattern`` holds boolean masks
            of the ranks kept, read here as their counts).
        oft: OFT's settings for its rotations, for an OFT adapter.
        projection_prng_key: VeRA's seed of its shared random A and B, regenerated
            from it when the adapter was saved without them (``save_projection=False``).
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: tuple[str, ...] = ()
    use_dora: bool = False
    init_lora_weights: bool | str = True
    loftq: bool = False
    peft_type: str = "LORA"
    feedforward_modules: tuple[str, ...] | str = ()
    init_r: int = 0
    oft: OftSettings | None = None
    projection_prng_key: int = 0

    def rank_for(self, module_name: str) -> int:
        """``rank_pattern``'s rank for a module, else ``r`` (PEFT's ``_create_and_replace``)."""
        key = pattern_key_for(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def is_feedforward(self, module_name: str) -> bool:
        """IA3: whether the module's vector scales its inputs, as PEFT's IA3Model decides it.

        ``_check_target_module_feedforward``: a string is a regex the whole name must
        match; a list holds names the module's name ends with.
        """
        if isinstance(self.feedforward_modules, str):
            return re.fullmatch(self.feedforward_modules, module_name) is not None
        return any(module_name.endswith(name) for name in self.feedforward_modules)

    def token_indices_for(self, module_name: str) -> list[int] | None:
        """The rows trainable tokens replace in one embedding (PEFT's dict keys name modules)."""
        indices = self.trainable_token_indices
        if isinstance(indices, dict):
            key = pattern_key_for(list(indices), module_name)
            return None if key is None else indices[key]
        return indices

    def scale_for(self, module_name: str, rank: int) -> float:
        """The factor that multiplies ``B @ A`` for one module.

        Reproduces PEFT's ``LoraLayer.update_layer``: alpha from ``alpha_pattern``
        (``get_pattern_key``) or ``lora_alpha``; ``alpha / r``, or ``alpha / sqrt(r)``
        with rsLoRA; computed in Python floats as PEFT does, so the scalar is the same.
        """
        alpha = self.lora_alpha
        key = pattern_key_for(self.alpha_pattern, module_name)
        if key is not None:
            alpha = self.alpha_pattern[key]
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def pattern_key_for(patterns: Iterable[str], module_name: str) -> str | None:
    """The first pattern key that matches a module name, as PEFT's ``get_pattern_key``.

    Keys are regexes anchored at the end of the name and at a dot boundary, so
    ``"v_proj"`` matches ``model.layers.0.self_attn.v_proj`` but ``"proj"`` does not.
    """
    for key in patterns:
        if re.match(_anchored(key), module_name):
            return key
    return None


def read_adapter_config(path: Path) -> LoraAdapterConfig:
    """Parse and check adapter_config.json.

    Raises:
        InvalidInputError: invalid JSON, not a LoRA adapter, or fields that make no sense.
    """
    raw = read_json_object(path)

    if raw.get("peft_type") is None:
        raise InvalidInputError(
            f"{path} has no 'peft_type': it is not a PEFT adapter config (point ADAPTER at the "
            "folder PEFT's save_pretrained() wrote)"
        )
    peft_type = check_peft_type(path, raw["peft_type"])
    alpha_field = MERGED_TYPES[peft_type][1]
    if alpha_field is None:  # IA3 (a learned vector), OFT (a rotation): no rank nor scale
        raw = {**raw, "r": 1, "alpha": 1.0}
        alpha_field = "alpha"
    r = raw.get("r")
    alpha = raw.get(alpha_field)
    if not isinstance(r, int) or not _is_positive_int(r):
        raise InvalidInputError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or not _is_number(alpha):
        raise InvalidInputError(f"{path}: {alpha_field!r} must be a number, got {alpha!r}")
    rank_pattern = raw.get("rank_pattern") or {}
    if peft_type == "ADALORA":
        rank_pattern = _adalora_rank_pattern(path, rank_pattern)
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        _is_positive_int(v) or (peft_type == "ADALORA" and v == 0) for v in rank_pattern.values()
    ):
        raise InvalidInputError(f"{path}: 'rank_pattern' must map patterns to positive integers")
    if not isinstance(alpha_pattern, dict) or not all(
        _is_number(v) for v in alpha_pattern.values()
    ):
        raise InvalidInputError(f"{path}: 'alpha_pattern' must map patterns to numbers")
    for pattern in (*rank_pattern, *alpha_pattern):
        try:
            re.compile(pattern)
            # As pattern_key_for uses it: "(?i)x" alone is valid, wrapped it is not.
            re.compile(_anchored(pattern))
        except (re.error, OverflowError, RecursionError) as err:
            raise InvalidInputError(
                f"{path}: pattern {pattern!r} is not a valid regex ({err})"
            ) from err
    token_indices = raw.get("trainable_token_indices")
    if token_indices is not None and not _is_token_indices(token_indices):
        raise InvalidInputError(
            f"{path}: 'trainable_token_indices' must be a list of token ids or map module "
            f"names to lists of token ids, got {token_indices!r}"
        )
    base_name = raw.get("base_model_name_or_path")
    target_parameters = raw.get("target_parameters") or []
    if not isinstance(target_parameters, list) or not all(
        isinstance(name, str) for name in target_parameters
    ):
        raise InvalidInputError(f"{path}: 'target_parameters' must be a list of parameter names")
    init_lora_weights = raw.get("init_lora_weights", True)
    if not isinstance(init_lora_weights, bool | str):
        raise InvalidInputError(
            f"{path}: 'init_lora_weights' must be true, false or the name of an "
            f"initialisation, got {init_lora_weights!r}"
        )
    return LoraAdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
        trainable_token_indices=token_indices,
        target_parameters=tuple(target_parameters),
        use_dora=bool(raw.get("use_dora", False)),
        init_lora_weights=init_lora_weights,
        # PEFT writes {} when LoftQ is not used; LoftQ's has loftq_bits and loftq_iter.
        loftq=bool(raw.get("loftq_config")),
        peft_type=peft_type,
        feedforward_modules=_feedforward_modules(path, raw.get("feedforward_modules")),
        init_r=_init_r(path, raw) if peft_type == "ADALORA" else 0,
        oft=_oft_settings(path, raw) if peft_type == "OFT" else None,
        projection_prng_key=(
            _prng_key(path, raw.get("projection_prng_key", 0)) if peft_type == "VERA" else 0
        ),
    )


def _prng_key(path: Path, value: object) -> int:
    """VeRA's ``projection_prng_key``: a seed for ``torch.Generator.manual_seed``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInputError(
            f"{path}: 'projection_prng_key' must be a non-negative integer, got {value!r}"
        )
    return value


def _oft_settings(path: Path, raw: dict[str, object]) -> OftSettings:
    """OFT's rotation settings, with PEFT 0.21's defaults where a field is absent."""
    defaults = OftSettings()
    eps = raw.get("eps", defaults.eps)
    terms = raw.get("num_cayley_neumann_terms", defaults.num_cayley_neumann_terms)
    if not _is_number(eps) or not _is_positive_int(terms):
        raise InvalidInputError(
            f"{path}: OFT's 'eps' must be a number and 'num_cayley_neumann_terms' a positive "
            f"integer, got {eps!r} and {terms!r}"
        )
    assert isinstance(eps, int | float) and isinstance(terms, int)
    return OftSettings(
        coft=bool(raw.get("coft", defaults.coft)),
        eps=float(eps),
        block_share=bool(raw.get("block_share", defaults.block_share)),
        use_cayley_neumann=bool(raw.get("use_cayley_neumann", defaults.use_cayley_neumann)),
        num_cayley_neumann_terms=terms,
    )


def _adalora_rank_pattern(path: Path, pattern: object) -> dict[str, int]:
    """AdaLoRA's ``rank_pattern``: ``<module>.lora_E`` -> the mask of ranks kept -> their count."""
    if not isinstance(pattern, dict) or not all(
        isinstance(mask, list) and all(isinstance(kept, bool) for kept in mask)
        for mask in pattern.values()
    ):
        raise InvalidInputError(
            f"{path}: an AdaLoRA 'rank_pattern' must map module names to lists of booleans"
        )
    return {re.escape(name.removesuffix(".lora_E")): sum(mask) for name, mask in pattern.items()}


def _init_r(path: Path, raw: dict[str, object]) -> int:
    """AdaLoRA's ``init_r`` (PEFT's default 12 when absent)."""
    init_r = raw.get("init_r", 12)
    if not _is_positive_int(init_r):
        raise InvalidInputError(f"{path}: 'init_r' must be a positive integer, got {init_r!r}")
    assert isinstance(init_r, int)
    return init_r


def _feedforward_modules(path: Path, value: object) -> tuple[str, ...] | str:
    """IA3's ``feedforward_modules``: a regex, or a list of name endings (PEFT saves either)."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise InvalidInputError(
                f"{path}: 'feedforward_modules' {value!r} is not a valid regex ({err})"
            ) from err
        return value
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return tuple(value)
    raise InvalidInputError(f"{path}: 'feedforward_modules' must be a regex or a list of names")


def _is_token_indices(value: object) -> bool:
    def is_id_list(ids: object) -> bool:
        return isinstance(ids, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        )

    if isinstance(value, dict):
        return all(isinstance(k, str) and is_id_list(v) for k, v in value.items())
    return is_id_list(value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _anchored(pattern: str) -> str:
    """PEFT's ``get_pattern_key`` regex for one pattern key."""
    return rf"(.*\.)?({pattern})$"


def _is_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        return False
