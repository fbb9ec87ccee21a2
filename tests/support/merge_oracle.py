"""An independent float64 oracle for merging a PEFT LoRA adapter, plus checkpoint-reading helpers.

The oracle only reads files (the base checkpoint and the saved adapter); it shares no code with
`lora_merge` and does not use PEFT's merge. For every tensor of the merged checkpoint it gives
the exact merged value (computed in float64) and a magnitude from which a rigorous-ish bound on
the rounding error of a float32 (or float64) computation can be derived.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

ADAPTER_KEY_PREFIX = "base_model.model."
FLOAT64_UNIT_ROUNDOFF = 2.0**-53
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype`'s representable numbers at |values| (as float64).

    For |x| in the normal range [2^e, 2^(e+1)) this is 2^e * eps; below the smallest normal
    (subnormals and zero) the spacing is constant, tiny * eps.
    """
    info = torch.finfo(dtype)
    magnitude = values.double().abs().clamp_min(info.tiny)
    _, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)


def merge_error_and_bound(
    output: torch.Tensor, weight: torch.Tensor, lora: LoraFactors, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How far a merged weight is from ``weight + scale * B @ A`` in float64, and the bound.

    Returns ``(error, half_ulp, bound)``: a merge that computes in float32 and rounds once to
    ``dtype`` has ``error <= half_ulp + bound``, where ``bound`` is the float32 (and float64
    reference) error of a rank-r product and one addition: (r + 2) unit roundoffs of
    ``|W| + scale * |B| @ |A|`` (the standard dot-product bound, Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1). ``lora`` comes from
    :func:`resolve_lora_factors`.
    """
    delta, magnitude = lora.delta_and_magnitude()
    weight = weight.double()
    exact = weight + lora.scale * delta
    bound = (
        (lora.rank + 2)
        * (FLOAT32_UNIT_ROUNDOFF + FLOAT64_UNIT_ROUNDOFF)
        * (weight.abs() + lora.scale * magnitude)
    )
    error = (output.double() - exact).abs()
    return error, 0.5 * ulp(output, dtype), bound


def expected_misroundings(bounds: torch.Tensor, ulps: torch.Tensor) -> float:
    """Upper bound on the expected number of elements that miss the correctly rounded value.

    Each element is evaluated with an error of at most ``bounds`` before its one rounding to
    a grid of spacing ``ulps``; it can round to the other neighbour only if its exact value
    lies within that error of a rounding midpoint. The exact values' positions within an ulp
    are spread evenly (their low bits are the noise of random weights), so that happens with
    probability at most min(1, 2 * bound / ulp).
    """
    return float(torch.clamp(2 * bounds.double() / ulps.double(), max=1.0).sum())


def misrounding_limit(expected: float) -> float:
    """A count of misrounded elements that a mean of ``expected`` exceeds with probability
    below 1e-6: Bernstein's inequality for a sum of independent indicators (variance <= mean)
    gives P(count >= mean + t) <= exp(-t² / (2 (mean + t / 3))) <= e^-15 for
    t = 6 sqrt(mean) + 10."""
    return expected + 6 * math.sqrt(expected) + 10


def read_safetensors_directory(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of every *.safetensors file in `directory` (no key may be in two files)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert key not in tensors, f"{key} is stored in more than one file of {directory}"
                tensors[key] = handle.get_tensor(key)
    return tensors


def read_adapter(adapter_directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config and tensors, from adapter_model.safetensors or adapter_model.bin."""
    config = json.loads((adapter_directory / "adapter_config.json").read_text())
    safetensors_file = adapter_directory / "adapter_model.safetensors"
    if safetensors_file.exists():
        return config, read_safetensors_directory(adapter_directory)
    tensors = torch.load(
        adapter_directory / "adapter_model.bin", map_location="cpu", weights_only=True
    )
    return config, dict(tensors)


def first_matching_pattern_value(patterns: dict, module_name: str) -> object | None:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key (in stored order) whose regex
    matches a dotted suffix of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA-adapted module: A, B, the resolved scale, and how the delta is laid out."""

    module_name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    is_embedding: bool
    fan_in_fan_out: bool
    dora_magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector, if any

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def transposed(self) -> bool:
        """The stored weight holds (B @ A).T: embeddings and GPT-2 Conv1D."""
        return self.is_embedding or self.fan_in_fan_out

    def delta_and_magnitude(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (float64) B @ A laid out like the base weight, and |B| @ |A| laid out the same.

        Convolutions: A (r, in, *kernel) and B (out, r, 1, ...) as 2-D matrices; the caller
        reshapes the (out, in * kernel) product to the weight's shape.
        """
        a = self.lora_a.double().reshape(self.rank, -1)
        b = self.lora_b.double().reshape(-1, self.rank)
        delta, magnitude = b @ a, b.abs() @ a.abs()
        # Embedding A is (r, vocab) and B is (dim, r), so B @ A is (dim, vocab) but the embedding
        # weight is (vocab, dim). GPT-2 Conv1D weights are stored (in, out), transposed too.
        if self.lora_a.dim() == 2 and self.transposed:
            delta, magnitude = delta.T, magnitude.T
        return delta, magnitude


def resolve_lora_factors(
    adapter_config: dict, adapter_tensors: dict[str, torch.Tensor]
) -> dict[str, LoraFactors]:
    """LoRA factors per module name (e.g. "model.layers.0.self_attn.q_proj"), scales resolved."""
    factor_suffixes = {
        ".lora_A.weight": ("A", False),
        ".lora_B.weight": ("B", False),
        ".lora_embedding_A": ("A", True),
        ".lora_embedding_B": ("B", True),
        ".lora_magnitude_vector": ("M", False),
    }
    pieces: dict[str, dict[str, object]] = {}
    for key, tensor in adapter_tensors.items():
        for suffix, (factor, is_embedding) in factor_suffixes.items():
            if key.endswith(suffix):
                module_name = key.removeprefix(ADAPTER_KEY_PREFIX).removesuffix(suffix)
                piece = pieces.setdefault(module_name, {"is_embedding": False})
                piece[factor] = tensor
                piece["is_embedding"] = bool(piece["is_embedding"]) or is_embedding
    factors = {}
    for module_name, piece in pieces.items():
        lora_a, lora_b = piece["A"], piece["B"]
        rank = lora_a.shape[0]
        alpha = first_matching_pattern_value(adapter_config.get("alpha_pattern") or {}, module_name)
        if alpha is None:
            alpha = adapter_config["lora_alpha"]
        scale = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
        factors[module_name] = LoraFactors(
            module_name=module_name,
            lora_a=lora_a,
            lora_b=lora_b,
            scale=scale,
            is_embedding=bool(piece["is_embedding"]),
            fan_in_fan_out=bool(adapter_config.get("fan_in_fan_out")) and lora_a.dim() == 2,
            dora_magnitude=piece.get("M"),
        )
    return factors


def trainable_token_rows(
    adapter_config: dict, adapter_tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Embedding weight name -> (token ids, their new rows), from trainable_token_indices."""
    suffix = ".token_adapter.trainable_tokens_delta"
    rows = {}
    for key, tensor in adapter_tensors.items():
        if key.endswith(suffix):
            module_name = key.removeprefix(ADAPTER_KEY_PREFIX).removesuffix(suffix)
            indices = adapter_config["trainable_token_indices"]
            if isinstance(indices, dict):
                indices = first_matching_pattern_value(indices, module_name)
            rows[f"{module_name}.weight"] = (list(indices), tensor)
    return rows


def full_tensor_replacements(adapter_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors that replace base tensors wholesale (modules_to_save, saved embedding
    base layers), keyed by the base checkpoint's tensor name."""
    replacements = {}
    for key, tensor in adapter_tensors.items():
        if "lora_" in key or "token_adapter" in key:
            continue
        base_name = key.removeprefix(ADAPTER_KEY_PREFIX).replace(".base_layer.", ".")
        replacements[base_name] = tensor
    return replacements


@dataclass(frozen=True)
class ExpectedTensor:
    """What the merged checkpoint should hold under one tensor name."""

    source: torch.Tensor  # the base tensor, or the adapter's replacement for it (original dtype)
    lora: LoraFactors | None  # None: the tensor passes through unchanged except for a dtype cast
    exact: torch.Tensor | None = None  # float64 source + scale * delta
    magnitude: torch.Tensor | None = None  # |source| + scale * |B| @ |A|, for error bounds
    # DoRA: the number of squares in each norm (the norm's rounding error grows with it)
    norm_length: int = 0

    def rounding_error_bound(self, unit_roundoff: float) -> torch.Tensor:
        """Bound on |computed - exact| for a length-r dot product, a scaling and an addition
        evaluated with `unit_roundoff`, plus our own float64 evaluation error; for DoRA, plus
        the error of a norm of `norm_length` squares and of the division and scaling."""
        assert self.lora is not None and self.magnitude is not None
        unit = unit_roundoff + FLOAT64_UNIT_ROUNDOFF
        bound = (self.lora.rank + 2) * unit * self.magnitude
        if self.norm_length:
            assert self.exact is not None
            bound = bound + (self.norm_length + 4) * unit * self.exact.abs()
        return bound


def expected_merged_checkpoint(
    base_directory: Path, adapter_directory: Path
) -> dict[str, ExpectedTensor]:
    """The float64 oracle: the expected content of every tensor of the merged checkpoint."""
    base_tensors = read_safetensors_directory(base_directory)
    adapter_config, adapter_tensors = read_adapter(adapter_directory)
    replacements = full_tensor_replacements(adapter_tensors)
    lora_by_weight_name = {
        f"{name}.weight": factors
        for name, factors in resolve_lora_factors(adapter_config, adapter_tensors).items()
    }
    assert set(replacements) <= set(base_tensors), "adapter replaces tensors the base does not have"
    assert set(lora_by_weight_name) <= set(base_tensors), (
        "adapter adapts modules the base does not have"
    )

    lora_bias_by_name = {
        f"{name}.bias": (factors, adapter_tensors[f"{ADAPTER_KEY_PREFIX}{name}.lora_B.bias"])
        for name, factors in resolve_lora_factors(adapter_config, adapter_tensors).items()
        if f"{ADAPTER_KEY_PREFIX}{name}.lora_B.bias" in adapter_tensors
    }

    token_rows = trainable_token_rows(adapter_config, adapter_tensors)

    expected = {}
    for name, base_tensor in base_tensors.items():
        if name in token_rows:  # PEFT trainable tokens: whole rows replaced, cast once
            indices, rows = token_rows[name]
            # float32 holds the base's 16-bit values and the new rows exactly: the cast to the
            # output dtype is then the one rounding of each.
            source = replacements.get(name, base_tensor).float()
            source[indices] = rows.float()
            expected[name] = ExpectedTensor(source=source, lora=None)
            continue
        if name in lora_bias_by_name:  # PEFT lora_bias=True: bias + scale * lora_B.bias
            lora, lora_bias = lora_bias_by_name[name]
            source = replacements.get(name, base_tensor)
            expected[name] = ExpectedTensor(
                source=source,
                lora=lora,
                exact=source.double() + lora.scale * lora_bias.double(),
                magnitude=source.double().abs() + lora.scale * lora_bias.double().abs(),
            )
            continue
        source = replacements.get(name, base_tensor)
        lora = lora_by_weight_name.get(name)
        if lora is None:
            expected[name] = ExpectedTensor(source=source, lora=None)
            continue
        delta, delta_magnitude = lora.delta_and_magnitude()
        assert delta.numel() == source.numel(), (
            f"{name}: delta {tuple(delta.shape)} vs weight {tuple(source.shape)}"
        )
        delta, delta_magnitude = delta.reshape(source.shape), delta_magnitude.reshape(source.shape)
        exact = source.double() + lora.scale * delta
        magnitude = source.double().abs() + lora.scale * delta_magnitude
        norm_length = 0
        if lora.dora_magnitude is not None:
            exact, factor, norm_length = dora_rescaled(exact, lora)
            magnitude = magnitude * factor.abs()
        expected[name] = ExpectedTensor(
            source=source,
            lora=lora,
            exact=exact,
            magnitude=magnitude,
            norm_length=norm_length,
        )
    return expected


def dora_rescaled(
    merged: torch.Tensor, lora: LoraFactors
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DoRA (Liu et al. 2024, as PEFT merges it): m / ||V|| * V with V = W + s * B @ A and the
    norm of each output feature's weights: a row of the stored weight (Linear; a convolution's
    output channel with all its input channels and kernel taps), or a column (embeddings, whose
    norm spans the vocabulary, and GPT-2 Conv1D). Returns the result, the factor broadcast to
    the weight's shape, and how many squares each norm sums."""
    assert lora.dora_magnitude is not None
    m = lora.dora_magnitude.double().reshape(-1)  # convolutions store (1, out, 1, ...)
    if lora.transposed and merged.dim() == 2:
        norms = merged.norm(dim=0)
        factor = (m / norms).reshape(1, -1).expand_as(merged)
        return merged * factor, factor, merged.shape[0]
    flat = merged.reshape(merged.shape[0], -1)
    factor = (m / flat.norm(dim=1)).reshape(-1, 1).expand_as(flat).reshape(merged.shape)
    return merged * factor, factor, flat.shape[1]
