"""How several adapters are combined: the ``--combine`` methods and their options, checked.

The methods are a table: each name says in which form the adapters are
combined and which of PEFT's operators does it. ``form``:

- ``cat``: the factors side by side, ``[w₁s₁A₁; w₂s₂A₂]`` and ``[B₁ B₂]``, whose
  product is exactly Σ wᵢsᵢBᵢAᵢ (PEFT ``cat``).
- ``factors``: A and B combined separately by the operator, as PEFT's
  ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` do
  (an approximation: the product of sums has cross terms).
- ``svd``: the operator on the full deltas ΔWᵢ = sᵢBᵢAᵢ, then a truncated SVD
  back to factors (PEFT's ``*_svd`` methods).
- ``full``: the operator on the full deltas, kept at full rank: the TIES and
  DARE papers' task arithmetic, which PEFT does not offer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

from lora_merge.compute.combine_names import Form, Operator, SignMethod
from lora_merge.errors import UsageError


@dataclass(frozen=True)
class CombineMethod:
    """One ``--combine`` method: the form it combines in and the operator it applies."""

    form: Form
    operator: Operator

    @property
    def uses_density(self) -> bool:
        return self.operator != "linear"

    @property
    def uses_sign_method(self) -> bool:
        return self.operator in ("ties", "dare_ties")

    @property
    def is_random(self) -> bool:
        return self.operator.startswith("dare")


COMBINE_METHODS: dict[str, CombineMethod] = {
    "cat": CombineMethod("cat", "linear"),
    "linear": CombineMethod("factors", "linear"),
    "ties": CombineMethod("factors", "ties"),
    "dare_linear": CombineMethod("factors", "dare_linear"),
    "dare_ties": CombineMethod("factors", "dare_ties"),
    "magnitude_prune": CombineMethod("factors", "magnitude_prune"),
    "svd": CombineMethod("svd", "linear"),
    "ties_svd": CombineMethod("svd", "ties"),
    "dare_linear_svd": CombineMethod("svd", "dare_linear"),
    "dare_ties_svd": CombineMethod("svd", "dare_ties"),
    "magnitude_prune_svd": CombineMethod("svd", "magnitude_prune"),
    "ties_full": CombineMethod("full", "ties"),
    "dare_linear_full": CombineMethod("full", "dare_linear"),
    "dare_ties_full": CombineMethod("full", "dare_ties"),
    "magnitude_prune_full": CombineMethod("full", "magnitude_prune"),
}
DEFAULT_COMBINE_METHOD = "cat"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class CombineRecipe:
    """A checked combination of adapters.

    Attributes:
        method_name: a key of :data:`COMBINE_METHODS`.
        weights: one per adapter (default 1.0 each).
        density: fraction kept by pruning (TIES, DARE, magnitude pruning).
        sign_method: TIES sign election, ``total`` or ``frequency``.
        svd_rank: rank of the ``*_svd`` result; None: the largest adapter rank.
        svd_clamp: quantile at which the ``*_svd`` factors are clamped, or None.
        seed: DARE's seed (masks are drawn per module from it).
    """

    method_name: str
    weights: tuple[float, ...]
    density: float = 1.0
    sign_method: SignMethod = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int = DEFAULT_SEED

    @property
    def method(self) -> CombineMethod:
        return COMBINE_METHODS[self.method_name]

    def describe(self) -> str:
        """A stable text of everything that decides the output (for resume fingerprints)."""
        return repr(self)


def parse_weights(value: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.7,0.3"`` (or a sequence of numbers) -> finite floats.

    Raises:
        UsageError: a weight is not a finite number.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    weights = []
    for item in items:
        try:
            weight = float(item)
        except (TypeError, ValueError) as err:
            raise UsageError(
                f"--weights: {str(item).strip()!r} is not a number; write e.g. --weights 0.7,0.3"
            ) from err
        if not math.isfinite(weight):
            raise UsageError(f"--weights: {weight} is not a finite number")
        weights.append(weight)
    return tuple(weights)


def build_combine_recipe(
    adapter_count: int,
    combine: str | None = None,
    weights: str | Sequence[float] | None = None,
    density: float | None = None,
    majority_sign_method: str | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int | None = None,
) -> CombineRecipe:
    """Check the combination options against each other and the number of adapters.

    An option that the chosen method would ignore is refused rather than
    silently dropped.

    Raises:
        UsageError: an unknown method, a weight count that differs from the
            adapter count, a density outside (0, 1], a missing density, an
            option the method does not use.
    """
    name = _choice_key(combine) if combine else DEFAULT_COMBINE_METHOD
    if name not in COMBINE_METHODS:
        raise UsageError(f"--combine {combine!r} is not one of {', '.join(COMBINE_METHODS)}")
    method = COMBINE_METHODS[name]
    parsed_weights = (1.0,) * adapter_count if weights is None else parse_weights(weights)
    if len(parsed_weights) != adapter_count:
        raise UsageError(
            f"--weights has {len(parsed_weights)} value(s) for {adapter_count} adapter(s); "
            "give one weight per adapter, in the same order"
        )

    def refuse_unless(used: bool, option: str, which: str) -> None:
        if not used:
            raise UsageError(f"{option} applies only to {which}, not to --combine {name}")

    if density is not None:
        refuse_unless(
            method.uses_density, "--density", "the ties, dare and magnitude_prune methods"
        )
        if not (_is_number(density) and 0 < density <= 1):
            raise UsageError(f"--density {density} must be in (0, 1]: the fraction of values kept")
    elif method.uses_density:
        raise UsageError(
            f"--combine {name} needs --density (the fraction of values kept, e.g. 0.5)"
        )
    sign: SignMethod = "total"
    if majority_sign_method is not None:
        refuse_unless(method.uses_sign_method, "--majority-sign-method", "the ties methods")
        sign_key = _choice_key(majority_sign_method)
        if sign_key not in get_args(SignMethod):
            raise UsageError(
                f"--majority-sign-method {majority_sign_method!r} is not one of "
                f"{', '.join(get_args(SignMethod))}"
            )
        sign = "frequency" if sign_key == "frequency" else "total"
    if svd_rank is not None:
        refuse_unless(method.form == "svd", "--svd-rank", "the *_svd methods")
        if not _is_integer(svd_rank) or svd_rank < 1:
            raise UsageError(f"--svd-rank {svd_rank} must be a positive integer")
    if svd_clamp is not None:
        refuse_unless(method.form == "svd", "--svd-clamp", "the *_svd methods")
        if not (_is_number(svd_clamp) and 0 < svd_clamp <= 1):
            raise UsageError(f"--svd-clamp {svd_clamp} must be a quantile in (0, 1], e.g. 0.99")
    if seed is not None:
        refuse_unless(method.is_random, "--seed", "the dare methods")
        if not _is_integer(seed):
            raise UsageError(f"--seed {seed!r} must be an integer")
    return CombineRecipe(
        method_name=name,
        weights=parsed_weights,
        density=1.0 if density is None else float(density),
        sign_method=sign,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        seed=DEFAULT_SEED if seed is None else seed,
    )


def _choice_key(value: object) -> str:
    """A choice as compared: any case means the same; a value that is no text matches nothing."""
    return value.strip().lower() if isinstance(value, str) else repr(value)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
