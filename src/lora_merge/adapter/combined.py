"""Several adapters seen as one: the planner and the stream read a combined adapter
exactly as they read a single one.

:class:`CombinedAdapter` is a ``TensorSource`` whose LoRA factors are computed
from the adapters' own, one module at a time, when the stream first reads them
(each worker thread keeps only the module it is merging), with its own
``adapter_config``-like object whose scale is 1 (every adapter's own scale,
alpha/r or rsLoRA, per its patterns, is already inside the combined factors).
This deliberately differs from PEFT's ``add_weighted_adapter``, whose combined
adapter inherits ``use_rslora`` from the first adapter and so multiplies the
combination by √r (PEFT PR #3473).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import PEFT_PREFIX, AdapterContents, LoraModuleKeys
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.adapter.refusals import refuse_lora_bias_in_combination
from lora_merge.compute.combine import combined_factors
from lora_merge.dtypes import F32, F64, DType
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.io.reader import TensorSource


@dataclass(frozen=True)
class AdapterInput:
    """One adapter of a combination, opened.

    Attributes:
        label: how messages name it (its folder).
        config: its adapter_config.json.
        contents: its keys, sorted by role.
        source: its tensors.
    """

    label: str
    config: LoraAdapterConfig
    contents: AdapterContents
    source: TensorSource


@dataclass(frozen=True)
class CombinedAdapterConfig(LoraAdapterConfig):
    """The combined adapter's config: its factors already carry every scale."""

    def scale_for(self, module_name: str, rank: int) -> float:
        return 1.0


@dataclass(frozen=True)
class _ModulePart:
    """One adapter's share of a module: which adapter, its keys, rank and scale."""

    index: int
    keys: LoraModuleKeys
    rank: int
    scale: float


class CombinedAdapter:
    """Several adapters combined by a :class:`CombineRecipe`, as one ``TensorSource``.

    Attributes:
        config: the combined adapter's config (scale 1 everywhere).
        contents: the combined keys: one LoRA module per module any adapter
            targets, and every adapter's replacement tensors.
    """

    def __init__(self, adapters: Sequence[AdapterInput], recipe: CombineRecipe) -> None:
        """Check that the adapters fit together and work out every combined shape.

        Raises:
            InvalidInputError: a LoRA bias, adapters that disagree on fan_in_fan_out, or
                ranks the method cannot combine (DoRA and trainable tokens are refused
                before, see :mod:`lora_merge.adapter.refusals`).
            AdapterMismatchError: two adapters disagree on a module's shape or on a
                full tensor they both replace.
        """
        self._adapters = list(adapters)
        self._recipe = recipe
        self._parts: dict[str, list[_ModulePart]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._factor_keys: dict[str, tuple[str, int]] = {}  # key -> (module, 0 for A / 1 for B)
        self._replacement_owner: dict[str, int] = {}  # key -> adapter index
        self._local = threading.local()
        self.contents = AdapterContents()

        for index, adapter in enumerate(self._adapters):
            self._add_module_parts(index, adapter)
            self._add_replacements(index, adapter)
        fan_in_fan_out = {a.config.fan_in_fan_out for a in self._adapters}
        if len(fan_in_fan_out) > 1:
            raise InvalidInputError(
                "the adapters disagree on fan_in_fan_out in adapter_config.json; adapters of "
                "one base model must agree (GPT-2 style Conv1D layers need true)"
            )
        # PEFT's default svd_rank: the largest rank any adapter's config allows.
        largest_configured_rank = max(
            max([a.config.r, *a.config.rank_pattern.values()]) for a in self._adapters
        )
        svd_rank = recipe.svd_rank or largest_configured_rank
        for module, parts in self._parts.items():
            out_features, in_features = self._check_module_shapes(module, parts)
            rank = self._combined_rank(module, parts, svd_rank, out_features, in_features)
            is_embedding = parts[0].keys.is_embedding
            suffix_a, suffix_b = (
                (".lora_embedding_A", ".lora_embedding_B")
                if is_embedding
                else (".lora_A.weight", ".lora_B.weight")
            )
            a_key, b_key = f"{PEFT_PREFIX}{module}{suffix_a}", f"{PEFT_PREFIX}{module}{suffix_b}"
            self._shapes[a_key] = (rank, in_features)
            self._shapes[b_key] = (out_features, rank)
            self._factor_keys[a_key] = (module, 0)
            self._factor_keys[b_key] = (module, 1)
            self.contents.lora_modules[module] = LoraModuleKeys(
                module=module,
                a_key=a_key,
                b_key=b_key,
                is_embedding=is_embedding,
                dense=recipe.method.form == "full",
            )
        first = self._adapters[0].config
        largest = max(
            (shape[0] for key, shape in self._shapes.items() if self._is_a(key)), default=1
        )
        self.config = CombinedAdapterConfig(
            r=largest,
            lora_alpha=float(largest),
            use_rslora=False,
            fan_in_fan_out=first.fan_in_fan_out,
            base_model_name_or_path=first.base_model_name_or_path,
        )

    # TensorSource

    def keys(self) -> Iterable[str]:
        return [*self._factor_keys, *self._replacement_owner]

    def close(self) -> None:
        """The adapters' own sources are closed by whoever opened them."""

    def dtype(self, key: str) -> DType:
        if key in self._factor_keys:
            # PEFT combines float32 factors (its adapters load as float32); the
            # other forms are computed in float64 so only the merge rounds.
            return F32 if self._recipe.method.form == "factors" else F64
        return self._owner(key).dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._factor_keys:
            return self._shapes[key]
        return self._owner(key).shape(key)

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        if key not in self._factor_keys:
            return self._owner(key).read_rows(key, start, stop, buffer)
        module, which = self._factor_keys[key]
        factors = self._module_factors(module)
        if factors[which] is None:  # B of a full-rank delta: the identity, never used to merge
            return torch.eye(self._shapes[key][0], dtype=torch.float64)[start:stop]
        tensor = factors[which]
        assert tensor is not None
        return tensor[start:stop]

    # memory, for --dry-run

    def held_bytes(self, workers: int) -> int:
        """Each thread keeps the last module a combination computed for it."""
        return workers * self.factor_cache_bytes()

    def factor_cache_bytes(self) -> int:
        """The largest module's combined A and B: what each thread keeps between modules."""
        by_module: dict[str, int] = {}
        for key, (module, which) in self._factor_keys.items():
            if which == 1 and self._recipe.method.form == "full":
                continue  # a full-rank combination has no B, only the whole delta in A
            size = self.dtype(key).itemsize * math.prod(self._shapes[key])
            by_module[module] = by_module.get(module, 0) + size
        return max(by_module.values(), default=0)

    def working_bytes(self, key: str) -> int:
        """An upper bound of the memory computing the combined factors of ``key``'s module
        takes, beyond the factors themselves: the adapters' own A and B as read, and the
        intermediates :meth:`_compute_factors` and its operators make, counted step by step.
        """
        module, _ = self._factor_keys[key]
        parts = self._parts[module]
        sources = [self._adapters[part.index].source for part in parts]
        read = a_elements = b_elements = 0
        for part, source in zip(parts, sources, strict=True):
            assert part.keys.a_key is not None and part.keys.b_key is not None
            a_shape, b_shape = source.shape(part.keys.a_key), source.shape(part.keys.b_key)
            a_elements += math.prod(a_shape)
            b_elements += math.prod(b_shape)
            read += source.dtype(part.keys.a_key).itemsize * math.prod(a_shape)
            read += source.dtype(part.keys.b_key).itemsize * math.prod(b_shape)
        out_features, in_features = b_shape[0], a_shape[1]  # the same for every part
        method, count = self._recipe.method, len(parts)
        if method.form == "cat":  # float64 copies, weighted, then concatenated
            work = 2 * 8 * (a_elements + b_elements)
        elif (
            method.form == "svd" and method.operator == "linear" and self._recipe.svd_clamp is None
        ):
            # The concatenation, then thin QRs of both and their products: (out + in) x r, 4 times.
            work = 6 * 8 * (a_elements + b_elements)
        elif method.form == "factors":
            # float32 copies, then per task: pruned, stacked, weighted, signs, agreement, masked.
            work = 7 * 4 * (a_elements + b_elements)
        else:
            # Whole (out, in) float64 deltas: the tasks' deltas, pruned, stacked, weighted,
            # signs, agreement and masked sum (7 per task), the combination and, for an
            # SVD, its input's copy, its factors and LAPACK's workspace (5 more).
            whole = 8 * out_features * in_features
            work = whole * (7 * count + (8 if method.form == "svd" else 3))
        return read + work

    # internals

    def _add_module_parts(self, index: int, adapter: AdapterInput) -> None:
        """Record the adapter's share (keys, rank, own scale) of every module it targets."""
        refuse_lora_bias_in_combination(adapter.label, adapter.contents)
        for module, keys in adapter.contents.lora_modules.items():
            assert keys.a_key is not None
            rank = adapter.source.shape(keys.a_key)[0]
            scale = adapter.config.scale_for(module, rank)
            self._parts.setdefault(module, []).append(_ModulePart(index, keys, rank, scale))

    def _add_replacements(self, index: int, adapter: AdapterInput) -> None:
        """Take over the adapter's full replacement tensors; two for one tensor are refused."""
        for target, key in adapter.contents.replacements.items():
            if target in self.contents.replacements:
                other = self._adapters[self._replacement_owner[self.contents.replacements[target]]]
                raise AdapterMismatchError(
                    f"adapters {other.label} and {adapter.label} both replace {target!r} "
                    "with a full tensor (modules_to_save, or the embedding PEFT saves when "
                    "an adapter targets it); only one adapter of a combination may replace "
                    "a given tensor (PEFT refuses two modules_to_save too). If the "
                    "vocabulary was not resized, save the adapters with "
                    "save_embedding_layers=False"
                )
            self.contents.replacements[target] = key
            self._replacement_owner[key] = index

    def _is_a(self, key: str) -> bool:
        return self._factor_keys.get(key, ("", 1))[1] == 0

    def _owner(self, key: str) -> TensorSource:
        return self._adapters[self._replacement_owner[key]].source

    def _check_module_shapes(self, module: str, parts: list[_ModulePart]) -> tuple[int, int]:
        """(out, in) of the module, the same for every adapter that targets it."""
        seen: list[tuple[_ModulePart, tuple[int, int], bool]] = []
        for part in parts:
            source = self._adapters[part.index].source
            assert part.keys.a_key is not None and part.keys.b_key is not None
            a_shape, b_shape = source.shape(part.keys.a_key), source.shape(part.keys.b_key)
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise InvalidInputError(
                    f"adapter {self._adapters[part.index].label} module {module!r} has LoRA "
                    f"matrices of shapes {a_shape} and {b_shape}; only Linear, Conv1D and "
                    "Embedding LoRA layers can be combined"
                )
            features = (b_shape[0], a_shape[1])
            for other, other_features, other_embedding in seen:
                if features != other_features or part.keys.is_embedding != other_embedding:
                    raise AdapterMismatchError(
                        f"adapters {self._adapters[other.index].label} and "
                        f"{self._adapters[part.index].label} disagree on module {module!r}: "
                        f"(out, in) = {other_features} vs {features}; adapters combined into "
                        "one model must have been trained on the same base model"
                    )
            seen.append((part, features, part.keys.is_embedding))
        return seen[0][1]

    def _combined_rank(
        self,
        module: str,
        parts: list[_ModulePart],
        svd_rank: int,
        out_features: int,
        in_features: int,
    ) -> int:
        form = self._recipe.method.form
        if form == "cat":
            return sum(part.rank for part in parts)
        if form == "svd":
            return min(svd_rank, out_features, in_features)
        if form == "full":
            return out_features  # A holds the whole (out, in) delta
        ranks = {part.rank for part in parts}
        if len(ranks) > 1:
            labels = ", ".join(f"{self._adapters[p.index].label} (r={p.rank})" for p in parts)
            raise InvalidInputError(
                f"--combine {self._recipe.method_name} combines A and B separately, so every "
                f"adapter needs the same rank, but module {module!r} has {labels}; use "
                "--combine cat (exact) or an *_svd method"
            )
        return parts[0].rank

    def _module_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A and B of the combined module, computed once per module and thread.

        Each stream thread reads A then B of the module it merges; keeping the
        last module per thread (not a cache shared between threads) bounds
        memory to one module per thread.
        """
        if getattr(self._local, "module", None) != module:
            self._local.factors = self._compute_factors(module)
            self._local.module = module
        factors: tuple[torch.Tensor, torch.Tensor | None] = self._local.factors
        return factors

    def _compute_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        recipe, method = self._recipe, self._recipe.method
        parts = self._parts[module]
        factors_a, factors_b = [], []
        for part in parts:
            source = self._adapters[part.index].source
            assert part.keys.a_key is not None and part.keys.b_key is not None
            factors_a.append(source.read_rows(part.keys.a_key))
            factors_b.append(source.read_rows(part.keys.b_key))
        weights = [recipe.weights[part.index] for part in parts]
        generator = mask_generator(recipe.seed, module) if method.is_random else None
        return combined_factors(
            method.form,
            method.operator,
            factors_a,
            factors_b,
            weights,
            [part.scale for part in parts],
            rank=self._rank_of(module),
            density=recipe.density,
            sign_method=recipe.sign_method,
            svd_clamp=recipe.svd_clamp,
            generator=generator,
        )

    def _rank_of(self, module: str) -> int:
        keys = self.contents.lora_modules[module]
        assert keys.a_key is not None
        return self._shapes[keys.a_key][0]


def mask_generator(seed: int, module: str) -> torch.Generator:
    """DARE's random source for one module: a CPU generator seeded from (seed, module name).

    The seed is the first 8 bytes (little-endian, top bit cleared) of
    ``blake2b(f"{seed}:{module}", digest_size=8)``, so each module's masks depend
    only on the seed and its name: not on the order modules are merged in, the
    number of threads, or the device.
    """
    digest = hashlib.blake2b(f"{seed}:{module}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
