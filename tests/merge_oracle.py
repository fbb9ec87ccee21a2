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

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta_and_magnitude(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (float64) B @ A laid out like the base weight, and |B| @ |A| laid out the same."""
        a, b = self.lora_a.double(), self.lora_b.double()
        delta, magnitude = b @ a, b.abs() @ a.abs()
        # Embedding A is (r, vocab) and B is (dim, r), so B @ A is (dim, vocab) but the embedding
        # weight is (vocab, dim). GPT-2 Conv1D weights are stored (in, out), transposed too.
        if self.is_embedding or self.fan_in_fan_out:
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
    }
    pieces: dict[str, dict[str, object]] = {}
    for key, tensor in adapter_tensors.items():
        for suffix, (factor, is_embedding) in factor_suffixes.items():
            if key.endswith(suffix):
                module_name = key.removeprefix(ADAPTER_KEY_PREFIX).removesuffix(suffix)
                pieces.setdefault(module_name, {"is_embedding": is_embedding})[factor] = tensor
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
            fan_in_fan_out=bool(adapter_config.get("fan_in_fan_out")),
        )
    return factors


def full_tensor_replacements(adapter_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors that replace base tensors wholesale (modules_to_save, saved embedding
    base layers), keyed by the base checkpoint's tensor name."""
    replacements = {}
    for key, tensor in adapter_tensors.items():
        if "lora_" in key:
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

    def rounding_error_bound(self, unit_roundoff: float) -> torch.Tensor:
        """Bound on |computed - exact| for a length-r dot product, a scaling and an addition
        evaluated with `unit_roundoff`, plus our own float64 evaluation error."""
        assert self.lora is not None and self.magnitude is not None
        return (self.lora.rank + 2) * (unit_roundoff + FLOAT64_UNIT_ROUNDOFF) * self.magnitude


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

    expected = {}
    for name, base_tensor in base_tensors.items():
        source = replacements.get(name, base_tensor)
        lora = lora_by_weight_name.get(name)
        if lora is None:
            expected[name] = ExpectedTensor(source=source, lora=None)
            continue
        delta, delta_magnitude = lora.delta_and_magnitude()
        assert delta.shape == source.shape, (
            f"{name}: delta {tuple(delta.shape)} vs weight {tuple(source.shape)}"
        )
        expected[name] = ExpectedTensor(
            source=source,
            lora=lora,
            exact=source.double() + lora.scale * delta,
            magnitude=source.double().abs() + lora.scale * delta_magnitude,
        )
    return expected
