"""Several adapters combined into one model (--combine), against PEFT and float64 oracles.

Two tiny Llama adapters share the base: adapter 1 (alpha/r) targets q/k/v/o, adapter 2
(rsLoRA) targets q/v/up/down, so some modules have both adapters and some only one.
PEFT's reference is ``add_weighted_adapter`` + ``merge_and_unload()``. Adapter 1, the first,
does not use rsLoRA: PEFT's combined adapter inherits ``use_rslora`` from the first adapter
and would then multiply the whole combination by sqrt(r) (PEFT PR #3473), which lora-merge
deliberately does not copy.

DARE draws random masks. PEFT draws them from torch's global RNG with ``torch.bernoulli``,
whose sequence we cannot reproduce module by module; so the PEFT comparisons replace
``torch.bernoulli`` during ``add_weighted_adapter`` by a function that hands PEFT the masks
lora-merge's documented rule gives (a CPU generator per module seeded from blake2b of
"{seed}:{module}", masks drawn adapter by adapter, A side then B side), re-derived here.
Everything else (drop, rescale, sign election, weights) is then PEFT's own code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from merge_oracle import (
    expected_misroundings,
    misrounding_limit,
    read_adapter,
    read_safetensors_directory,
    resolve_lora_factors,
    ulp,
)
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from svd_error_bounds import (
    FLOAT32_UNIT_ROUNDOFF,
    FLOAT64_UNIT_ROUNDOFF,
    Task,
    clamped_candidates,
    clamped_perturbation,
    combination_error,
    merge_error,
    perturbed_matrix_bound,
    truncation_bound,
    within,
)
from tiny_checkpoints import (
    float64_copy,
    ignoring_expected_peft_warnings,
    prompt_logits,
    save_tiny_lora_adapter,
    stable_seed,
    unmerged_tolerance,
)
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lora_merge import MergeOptions, merge
from lora_merge.adapter.combined import mask_generator as mask_generator_under_test
from lora_merge.adapter.recipe import build_combine_recipe
from lora_merge.cli import app
from lora_merge.compute.combine import randomly_pruned
from lora_merge.errors import AdapterMismatchError, InvalidInputError, UsageError
from lora_merge.plan.fingerprint import merge_fingerprint

WEIGHTS = (0.7, -0.4)
DENSITY = 0.5
SEED = 7
ADAPTER_CONFIGS = (
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {
        "r": 8,
        "lora_alpha": 12,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
    },
)
# A third adapter of another rank: for cat and svd, which accept different ranks.
RANK_4_CONFIG = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"]}


def adapter_dirs(tmp_path_factory, base: Path, dtype: torch.dtype, configs) -> list[Path]:
    return [
        save_tiny_lora_adapter(
            base,
            dtype,
            LoraConfig(init_lora_weights=False, **config),
            tmp_path_factory.mktemp(f"combine-adapter-{i}"),
            seed=stable_seed("combine", i, str(dtype)),
            safe_serialization=True,
        )
        for i, config in enumerate(configs)
    ]


@pytest.fixture(scope="module")
def bf16_inputs(tiny_base_checkpoint, tmp_path_factory):
    base = tiny_base_checkpoint("llama", torch.bfloat16)
    return base, adapter_dirs(tmp_path_factory, base, torch.bfloat16, ADAPTER_CONFIGS)


@pytest.fixture(scope="module")
def fp32_inputs(tiny_base_checkpoint, tmp_path_factory):
    base = tiny_base_checkpoint("llama", torch.float32)
    configs = (*ADAPTER_CONFIGS, RANK_4_CONFIG)
    return base, adapter_dirs(tmp_path_factory, base, torch.float32, configs)


def run_merge(tmp_path: Path, base: Path, adapters: list[Path], **options) -> dict:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    merge(MergeOptions(base=base, adapter=adapters, out=out, quiet=True, **options))
    return read_safetensors_directory(out)


def mask_generator(seed: int, module: str) -> torch.Generator:
    """The README's rule for DARE masks, written independently of lora_merge."""
    digest = hashlib.blake2b(f"{seed}:{module}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def draw_mask(generator: torch.Generator, shape, density: float) -> torch.Tensor:
    return torch.bernoulli(
        torch.full(tuple(shape), density, dtype=torch.float32), generator=generator
    )


def peft_merged(
    base: Path, adapters: list[Path], method: str, monkeypatch, **kwargs
) -> dict[str, torch.Tensor]:
    """PEFT add_weighted_adapter + merge_and_unload, in bf16 as the base."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(adapters))]
    with ignoring_expected_peft_warnings():
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:], strict=True):
            peft_model.load_adapter(adapter, adapter_name=name)
    # PEFT loads the adapters' factors as float32 (autocast_adapter_dtype), so its deltas,
    # combination and SVD run in float32: the error model of test_svd_methods_agree_with_peft.
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    masks = []
    if method.startswith("dare"):
        masks = feed_lora_merge_masks(peft_model, names, monkeypatch, method.endswith("_svd"))
    peft_model.add_weighted_adapter(
        names, list(WEIGHTS), "combined", combination_type=method, **kwargs
    )
    assert masks == [], "PEFT drew fewer DARE masks than lora-merge's rule gives"
    peft_model.set_adapter("combined")
    merged = peft_model.merge_and_unload(adapter_names=["combined"])
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def feed_lora_merge_masks(
    peft_model, names: list[str], monkeypatch, full_deltas: bool
) -> list[torch.Tensor]:
    """Make PEFT's DARE use the masks lora-merge's rule draws (see the module docstring)."""
    from peft.tuners.lora import LoraLayer

    queue: list[torch.Tensor] = []
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [n for n in names if n in module.lora_A]
        generator = mask_generator(SEED, module_name.removeprefix("base_model.model."))
        if full_deltas:  # *_svd: one mask per adapter over its (out, in) delta
            for name in present:
                shape = (module.lora_B[name].weight.shape[0], module.lora_A[name].weight.shape[1])
                queue.append(draw_mask(generator, shape, DENSITY))
            continue
        for side in ("lora_A", "lora_B"):  # A and B combined separately: A's masks first
            for name in present:
                shape = getattr(module, side)[name].weight.shape
                queue.append(draw_mask(generator, shape, DENSITY))

    def fake_bernoulli(probabilities, *args, **kwargs):
        mask = queue.pop(0)
        assert mask.shape == probabilities.shape and float(probabilities.flatten()[0]) == DENSITY
        return mask.to(probabilities.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    return queue


def differing(ours: dict, theirs: dict) -> dict[str, int]:
    return {
        name: int((ours[name] != theirs[name]).sum())
        for name in ours
        if not torch.equal(ours[name], theirs[name])
    }


# PEFT combines A and B separately in float32 (its adapters load as float32) and merges
# W += (B' @ A') * 1 in float32 with one rounding: lora-merge does the same sums in the
# same order, so a bf16 merge is bit-identical, DARE included once its masks are shared.
@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("linear", {}),
        ("ties", {"density": DENSITY}),
        ("ties", {"density": DENSITY, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": DENSITY}),
        ("dare_linear", {"density": DENSITY, "seed": SEED}),
        ("dare_ties", {"density": DENSITY, "seed": SEED}),
    ],
    ids=["linear", "ties-total", "ties-frequency", "magnitude_prune", "dare_linear", "dare_ties"],
)
def test_factor_methods_are_bit_identical_to_peft(
    bf16_inputs, tmp_path, monkeypatch, method, kwargs
):
    base, adapters = bf16_inputs
    ours = run_merge(tmp_path, base, adapters, combine=method, weights=WEIGHTS, **kwargs)
    peft_kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
    theirs = peft_merged(base, adapters, method, monkeypatch, **peft_kwargs)
    assert set(ours) == set(theirs)
    assert differing(ours, theirs) == {}
    changed = [n for n in ours if not torch.equal(ours[n], read_safetensors_directory(base)[n])]
    assert len(changed) == 12  # q, k, v, o, up, down in both layers


def exact_deltas(adapters: list[Path]) -> list[dict[str, torch.Tensor]]:
    """Per adapter: module weight name -> its float64 s * B @ A, laid out as the weight."""
    deltas = []
    for adapter in adapters:
        config, tensors = read_adapter(adapter)
        deltas.append(
            {
                f"{name}.weight": f.scale * f.delta_and_magnitude()[0]
                for name, f in resolve_lora_factors(config, tensors).items()
            }
        )
    return deltas


def exact_combination(base: dict, deltas: list[dict], weights, name: str) -> torch.Tensor:
    """float64 W + Σ wᵢ ΔWᵢ over the adapters that target `name`."""
    exact = base[name].double()
    for weight, adapter_deltas in zip(weights, deltas, strict=True):
        if name in adapter_deltas:
            exact = exact + weight * adapter_deltas[name]
    return exact


def test_cat_is_closer_to_exact_than_peft_wherever_they_differ(bf16_inputs, tmp_path, monkeypatch):
    """cat: PEFT writes w*s*A into its combined adapter (created in the base's bf16 here), so
    its factors are rounded; lora-merge keeps them in float64 and rounds once, so wherever the
    two differ, lora-merge is the closer to the float64 sum, up to its own float32 evaluation
    error (which decides only where the exact sum is that close to a rounding midpoint)."""
    base, adapters = bf16_inputs
    ours = run_merge(tmp_path, base, adapters, combine="cat", weights=WEIGHTS)
    theirs = peft_merged(base, adapters, "cat", monkeypatch)
    base_tensors, deltas = read_safetensors_directory(base), exact_deltas(adapters)
    magnitudes = exact_magnitudes(adapters)
    differ = 0
    for name in differing(ours, theirs):
        exact = exact_combination(base_tensors, deltas, WEIGHTS, name)
        bound = cat_evaluation_bound(base_tensors, magnitudes, WEIGHTS, name, FLOAT32_UNIT_ROUNDOFF)
        our_error = (ours[name].double() - exact).abs()
        peft_error = (theirs[name].double() - exact).abs()
        assert bool((our_error <= peft_error + bound).all()), name
        differ += int((ours[name] != theirs[name]).sum())
    assert differ > 1000  # PEFT's extra rounding shows, so the comparison has teeth


@pytest.mark.parametrize("output", ["fp32", "bf16"])
def test_cat_is_the_correctly_rounded_weighted_sum(fp32_inputs, tmp_path, output):
    """cat of three adapters (ranks 8, 8, 4; alpha/r and rsLoRA) is W + Σ wᵢsᵢBᵢAᵢ rounded
    once: within half an ulp of the float64 sum, up to the error of its evaluation (float64
    for an fp32 output, float32 for bf16, as single merges), so that only elements whose exact
    value lies that close to a rounding midpoint may round the other way."""
    base, adapters = fp32_inputs
    weights = (0.7, -0.4, 1.3)
    ours = run_merge(tmp_path, base, adapters, weights=weights, dtype=output)
    base_tensors, deltas = read_safetensors_directory(base), exact_deltas(adapters)
    magnitudes = exact_magnitudes(adapters)
    dtype, unit = (
        (torch.float32, FLOAT64_UNIT_ROUNDOFF)
        if output == "fp32"
        else (torch.bfloat16, FLOAT32_UNIT_ROUNDOFF)
    )
    targeted = {name for d in deltas for name in d}
    assert len(targeted) == 12
    beyond_half, expected_beyond_half = 0, 0.0
    for name in targeted:
        exact = exact_combination(base_tensors, deltas, weights, name)
        bound = cat_evaluation_bound(base_tensors, magnitudes, weights, name, unit)
        half_ulp = 0.5 * ulp(ours[name], dtype)
        error = (ours[name].double() - exact).abs()
        assert bool((error <= half_ulp + bound).all()), name
        beyond_half += int((error > half_ulp).sum())
        expected_beyond_half += expected_misroundings(bound, 2 * half_ulp)
    limit = misrounding_limit(expected_beyond_half)
    print(f"cat {output}: {beyond_half} elements beyond half an ulp, limit {limit:.1f}")
    assert beyond_half <= limit


def cat_evaluation_bound(base_tensors, magnitudes, weights, name: str, unit: float):
    """Bound on the evaluation error of W + Σ wᵢsᵢBᵢAᵢ over the concatenated factors: a dot
    product of length Σ rᵢ (each factor rounded once from float64) and the sum with W, i.e.
    (Σ rᵢ + 4) unit roundoffs of |W| + Σ |wᵢ||sᵢ||Bᵢ||Aᵢ|."""
    present = [(abs(w), m[name]) for w, m in zip(weights, magnitudes, strict=True) if name in m]
    magnitude = base_tensors[name].double().abs() + sum(w * m for w, (m, _) in present)
    return (sum(rank for _, (_, rank) in present) + 4) * unit * magnitude


def exact_magnitudes(adapters: list[Path]) -> list[dict[str, tuple[torch.Tensor, int]]]:
    """Per adapter: module weight name -> (|s| |B| @ |A| in float64, laid out as the weight;
    the rank), for error bounds."""
    magnitudes = []
    for adapter in adapters:
        config, tensors = read_adapter(adapter)
        magnitudes.append(
            {
                f"{name}.weight": (abs(f.scale) * f.delta_and_magnitude()[1], f.rank)
                for name, f in resolve_lora_factors(config, tensors).items()
            }
        )
    return magnitudes


def test_svd_is_the_truncated_svd_of_the_weighted_sum(fp32_inputs, tmp_path):
    """svd at rank 6: W + the best rank-6 approximation of Σ wᵢsᵢBᵢAᵢ (float64 SVD in the
    test), correctly rounded to fp32 up to the float64 error of the combination, the SVD and
    the merge (bounded as in svd_error_bounds.py; both lora-merge and the test compute in
    float64, hence twice the truncation's bound)."""
    base, adapters = fp32_inputs
    weights = (0.7, -0.4, 1.3)
    rank = 6
    ours = run_merge(tmp_path, base, adapters, weights=weights, combine="svd", svd_rank=rank)
    base_tensors, deltas = read_safetensors_directory(base), exact_deltas(adapters)
    magnitudes = exact_magnitudes(adapters)
    for name in {name for d in deltas for name in d}:
        weight = base_tensors[name].double()
        tasks = [
            Task(w, d[name], *m[name])
            for w, d, m in zip(weights, deltas, magnitudes, strict=True)
            if name in d
        ]
        combined = exact_combination(base_tensors, deltas, weights, name) - weight
        error = combination_error(
            tasks, combined, FLOAT64_UNIT_ROUNDOFF, False, 1.0, False, "total"
        )
        epsilon = perturbed_matrix_bound(combined, error, FLOAT64_UNIT_ROUNDOFF)
        u, s, vh = torch.linalg.svd(combined, full_matrices=False)
        delta = (u[:, :rank] * s[:rank]) @ vh[:rank]
        moved = 2 * truncation_bound(s, rank, epsilon)
        products = (delta.norm(dim=1) + moved).view(-1, 1).expand_as(delta)
        allowed = moved + merge_error(
            weight, delta.abs() + moved, products, rank, FLOAT64_UNIT_ROUNDOFF
        )
        ok, ratio = within(ours[name], weight + delta, allowed)
        assert ok, f"{name}: {ratio:.3g} times its error bound"


# PEFT computes the *_svd methods in float32 (its deltas, the operator, the SVD); lora-merge
# in float64. Neither gives the bits of the other, nor the same bits on every CPU (SVD and
# matmul kernels differ), so each is compared with the float64 reference (the papers'
# combination below, then a float64 SVD) within a bound derived in svd_error_bounds.py from
# the precision it computes in, the SVD's conditioning and the output's rounding.
@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("svd", {}),
        ("svd", {"svd_rank": 4}),
        ("svd", {"svd_clamp": 0.9}),
        ("ties_svd", {"density": DENSITY}),
        ("magnitude_prune_svd", {"density": DENSITY}),
        ("dare_linear_svd", {"density": DENSITY, "seed": SEED}),
        ("dare_ties_svd", {"density": DENSITY, "seed": SEED}),
    ],
    ids=[
        "svd",
        "svd-rank4",
        "svd-clamp",
        "ties_svd",
        "magnitude_prune_svd",
        "dare_linear_svd",
        "dare_ties_svd",
    ],
)
def test_svd_methods_agree_with_peft(bf16_inputs, tmp_path, monkeypatch, method, kwargs):
    """lora-merge and PEFT are each within their error bound of W + the float64 truncated SVD
    of the float64 combination, on every element (so within the sum of bounds of each other).
    With svd_clamp the result depends on the sign LAPACK gives each singular pair: each must
    match the reference under some choice of signs."""
    base, adapters = bf16_inputs
    ours = run_merge(tmp_path, base, adapters, combine=method, weights=WEIGHTS, **kwargs)
    peft_kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
    theirs = peft_merged(base, adapters, method, monkeypatch, **peft_kwargs)
    monkeypatch.undo()  # torch.bernoulli again, for the oracle's own masks
    base_tensors = read_safetensors_directory(base)
    assert set(ours) == set(theirs)
    tasks_by_name = svd_tasks(adapters, method, kwargs.get("density", 1.0))
    assert len(tasks_by_name) == 12  # q, k, v, o, up, down in both layers
    rank = kwargs.get("svd_rank", max(config["r"] for config in ADAPTER_CONFIGS))
    precisions = {
        "lora-merge": (ours, FLOAT64_UNIT_ROUNDOFF),
        "PEFT": (theirs, FLOAT32_UNIT_ROUNDOFF),
    }
    worst = dict.fromkeys(precisions, 0.0)
    for name, tasks in tasks_by_name.items():
        present = [task.weight for task in tasks]
        combined = paper_combination(
            method.removesuffix("_svd"),
            [task.undropped for task in tasks],
            present,
            kwargs.get("density", 1.0),
            name.removesuffix(".weight"),
            kwargs.get("majority_sign_method", "total"),
        )
        weight = base_tensors[name].double()
        for who, (output, unit) in precisions.items():
            ratio = svd_output_error_ratio(
                output[name], weight, combined, tasks, method, kwargs, rank, unit
            )
            assert ratio <= 1, f"{who}, {name}: {ratio:.3g} times its error bound"
            worst[who] = max(worst[who], ratio)
    print(f"{method} {kwargs}: worst error / bound {worst}")


@dataclass(frozen=True)
class SvdTask(Task):
    """A Task that also keeps the delta before DARE's drop (the papers' oracle draws again)."""

    undropped: torch.Tensor | None = None


def svd_tasks(adapters: list[Path], method: str, density: float) -> dict[str, list[SvdTask]]:
    """Per targeted weight, each adapter's task (weight, delta, |B||A|, rank), DARE applied."""
    tasks: dict[str, list[SvdTask]] = {}
    for weight, adapter in zip(WEIGHTS, adapters, strict=True):
        config, tensors = read_adapter(adapter)
        for module, factors in resolve_lora_factors(config, tensors).items():
            delta, magnitude = factors.delta_and_magnitude()
            tasks.setdefault(f"{module}.weight", []).append(
                SvdTask(
                    weight,
                    factors.scale * delta,
                    factors.scale * magnitude,
                    factors.rank,
                    undropped=factors.scale * delta,
                )
            )
    if method.startswith("dare"):  # the README's masks, drawn adapter by adapter
        for name, module_tasks in tasks.items():
            generator = mask_generator(SEED, name.removesuffix(".weight"))
            for i, task in enumerate(module_tasks):
                kept = draw_mask(generator, task.delta.shape, density).double() / density
                module_tasks[i] = SvdTask(
                    task.weight,
                    task.delta * kept,
                    task.magnitude * kept,
                    task.rank,
                    undropped=task.undropped,
                )
    return tasks


def svd_output_error_ratio(
    output: torch.Tensor,
    weight: torch.Tensor,
    combined: torch.Tensor,
    tasks: list[SvdTask],
    method: str,
    kwargs: dict,
    rank: int,
    unit: float,
) -> float:
    """The worst |output - reference| / allowed over the module (<= 1 passes), where allowed is
    the implementation's bound plus the float64 reference's own, the float32 merge's and half
    an ulp of the output (svd_error_bounds.py)."""
    operator = method.removesuffix("_svd")
    density = kwargs.get("density", 1.0)

    def epsilon(unit: float) -> float:
        error = combination_error(
            tasks,
            combined,
            unit,
            trims=operator in ("ties", "magnitude_prune"),
            density=density,
            elects_sign=operator in ("ties", "dare_ties"),
            sign_method=kwargs.get("majority_sign_method", "total"),
        )
        return perturbed_matrix_bound(combined, error, unit)

    implementation, reference = epsilon(unit), epsilon(FLOAT64_UNIT_ROUNDOFF)
    clamp = kwargs.get("svd_clamp")
    if clamp is None:
        u, s, vh = torch.linalg.svd(combined, full_matrices=False)
        k = min(rank, s.numel())
        delta = (u[:, :k] * s[:k]) @ vh[:k]
        moved = truncation_bound(s, k, implementation) + truncation_bound(s, k, reference)
        products = (delta.norm(dim=1) + moved).view(-1, 1).expand_as(delta)
        allowed = moved + merge_error(weight, delta.abs() + moved, products, k)
        return within(output, weight + delta, allowed)[1]
    candidates, s = clamped_candidates(combined, rank, clamp)
    k = min(rank, s.numel())
    ratios = []
    for candidate in candidates:
        moved, products = clamped_perturbation(candidate, s, k, implementation, unit)
        moved = moved + clamped_perturbation(candidate, s, k, reference, FLOAT64_UNIT_ROUNDOFF)[0]
        allowed = moved + merge_error(weight, candidate.delta.abs() + moved, products, k)
        ratios.append(within(output, weight + candidate.delta, allowed)[1])
    return min(ratios)


# The task arithmetic of the TIES paper (Yadav et al., 2023: trim each task vector to its
# top-k magnitudes, elect a sign per parameter from the summed trimmed vectors, average the
# entries that agree with it) and of DARE (Yu et al., 2023: drop each entry with probability
# 1 - density and rescale the kept ones by 1 / density), on the full deltas ΔWᵢ = sᵢBᵢAᵢ,
# in float64, written here from the papers; the weights wᵢ multiply each task vector in the
# merge step, as PEFT applies them.
def paper_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * delta.numel())
    order = torch.argsort(delta.abs().flatten(), descending=True)
    kept = torch.zeros(delta.numel(), dtype=torch.bool)
    kept[order[:keep]] = True
    return torch.where(kept.view(delta.shape), delta, torch.zeros_like(delta))


def paper_disjoint_mean(tasks: list[torch.Tensor], weights, sign_method: str) -> torch.Tensor:
    signs = [torch.sign(t) for t in tasks]
    votes = sum(tasks) if sign_method == "total" else sum(signs)
    elected = torch.where(votes >= 0, 1.0, -1.0).double()
    agreeing = [(s == elected).double() for s in signs]
    total = sum(w * t * a for w, t, a in zip(weights, tasks, agreeing, strict=True))
    return total / torch.clamp(sum(agreeing), min=1.0)


def paper_combination(method, deltas, weights, density, module, sign_method="total"):
    if method.startswith("dare"):
        generator = mask_generator(SEED, module)
        deltas = [d * draw_mask(generator, d.shape, density).double() / density for d in deltas]
    elif method.startswith(("ties", "magnitude_prune")):
        deltas = [paper_trim(d, density) for d in deltas]
    if "ties" in method:
        return paper_disjoint_mean(deltas, weights, sign_method)
    return sum(w * d for w, d in zip(weights, deltas, strict=True))


@pytest.mark.parametrize(
    ("method", "density", "sign_method"),
    [
        ("ties_full", 0.3, "total"),
        ("ties_full", 0.3, "frequency"),
        ("magnitude_prune_full", 0.3, None),
        ("dare_linear_full", 0.5, None),
        ("dare_ties_full", 0.5, None),
    ],
    ids=["ties-total", "ties-frequency", "magnitude_prune", "dare_linear", "dare_ties"],
)
def test_full_delta_methods_are_the_papers_task_arithmetic(
    fp32_inputs, tmp_path, method, density, sign_method
):
    """The *_full methods on three adapters (one module has all three, others one or two),
    fp32: within 0.5 ulp of the float64 paper definitions, on every adapted element."""
    base, adapters = fp32_inputs
    weights = (0.7, -0.4, 1.3)
    options = {"density": density, "majority_sign_method": sign_method}
    if method.startswith("dare"):
        options["seed"] = SEED
    ours = run_merge(tmp_path, base, adapters, combine=method, weights=weights, **options)
    base_tensors, deltas = read_safetensors_directory(base), exact_deltas(adapters)
    for name in {name for d in deltas for name in d}:
        present = [(w, d[name]) for w, d in zip(weights, deltas, strict=True) if name in d]
        combined = paper_combination(
            method,
            [d for _, d in present],
            [w for w, _ in present],
            density,
            name.removesuffix(".weight"),
            sign_method or "total",
        )
        expected = base_tensors[name].double() + combined
        error_in_ulps = (ours[name].double() - expected).abs() / ulp(expected, torch.float32)
        assert float(error_in_ulps.max()) <= 0.5 + 1e-6, name
        assert not torch.equal(ours[name], base_tensors[name])


def test_full_delta_on_transposed_conv1d_weights(tiny_base_checkpoint, tmp_path_factory, tmp_path):
    """GPT-2 stores Conv1D weights (in, out): a full-rank combined delta is added transposed."""
    base = tiny_base_checkpoint("gpt2", torch.float32)
    configs = [
        {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"]},
        {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True, "target_modules": ["c_attn"]},
    ]
    adapters = adapter_dirs(tmp_path_factory, base, torch.float32, configs)
    ours = run_merge(
        tmp_path, base, adapters, combine="ties_full", density=0.4, weights=(1.0, 0.5), verify=True
    )
    base_tensors, deltas = read_safetensors_directory(base), exact_deltas(adapters)
    names = {name for d in deltas for name in d}
    assert len(names) == 4
    for name in names:
        present = [(w, d[name]) for w, d in zip((1.0, 0.5), deltas, strict=True) if name in d]
        combined = paper_combination(
            "ties", [d for _, d in present], [w for w, _ in present], 0.4, name
        )
        expected = base_tensors[name].double() + combined
        assert ours[name].shape == base_tensors[name].shape != combined.T.shape
        error_in_ulps = (ours[name].double() - expected).abs() / ulp(expected, torch.float32)
        assert float(error_in_ulps.max()) <= 0.5 + 1e-6, name


def test_combined_model_logits_match_peft_unmerged(fp32_inputs, tmp_path):
    """The merged cat combination computes what PEFT's unmerged combined adapter computes:
    logits within 3x PEFT's own float32 noise (tiny_checkpoints.unmerged_tolerance)."""
    base, adapters = fp32_inputs
    adapters = adapters[:2]
    out = tmp_path / "merged"
    merge(MergeOptions(base=base, adapter=adapters, out=out, weights=WEIGHTS, quiet=True))
    merged_logits = prompt_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with ignoring_expected_peft_warnings():
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        peft_model.load_adapter(adapters[1], adapter_name="a1")
    peft_model.add_weighted_adapter(["a0", "a1"], list(WEIGHTS), "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    peft_logits = prompt_logits(peft_model.eval())
    float64_logits = prompt_logits(float64_copy(peft_model), torch.float64)
    base_logits = prompt_logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))

    tolerance = unmerged_tolerance(peft_logits, float64_logits, torch.float32)
    assert float((merged_logits - peft_logits).abs().max()) <= tolerance
    assert float((base_logits - peft_logits).abs().max()) > 100 * tolerance  # adapters matter


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": "0.5"}, "1 value(s) for 2 adapter(s)"),
        ({"weights": "0.5,x"}, "'x' is not a number"),
        ({"combine": "average"}, "is not one of cat, linear"),
        ({"combine": "ties"}, "needs --density"),
        ({"combine": "ties", "density": 0.0}, "must be in (0, 1]"),
        ({"combine": "ties", "density": 1.5}, "must be in (0, 1]"),
        ({"combine": "linear", "density": 0.5}, "--density applies only to"),
        ({"combine": "cat", "svd_rank": 4}, "--svd-rank applies only to the *_svd"),
        ({"combine": "svd", "svd_clamp": 1.5}, "quantile in (0, 1]"),
        ({"combine": "ties", "density": 0.5, "seed": 1}, "--seed applies only to the dare"),
        ({"combine": "ties", "density": 0.5, "majority_sign_method": "mean"}, "total, frequency"),
    ],
)
def test_inconsistent_combination_options_are_usage_errors(bf16_inputs, tmp_path, options, message):
    base, adapters = bf16_inputs
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        merge(MergeOptions(base=base, adapter=adapters, out=out, **options))
    assert raised.value.exit_code == 2
    assert not out.exists()


def test_cli_takes_several_adapters_and_refuses_bad_weights_with_exit_2(bf16_inputs, tmp_path):
    """BASE ADAPTER ADAPTER OUT on the command line; --verify and --resume work on a combination."""
    base, adapters = bf16_inputs
    runner = CliRunner()
    bad = runner.invoke(
        app, [str(base), *map(str, adapters), str(tmp_path / "x"), "--weights", "1"]
    )
    assert bad.exit_code == 2 and "--weights has 1 value(s) for 2 adapter(s)" in bad.output
    assert not (tmp_path / "x").exists()
    out = tmp_path / "out"
    options = ["--weights", "0.7,-0.4", "--json", "-q", "--verify", "--resume"]
    good = runner.invoke(app, [str(base), *map(str, adapters), str(out), *options])
    assert good.exit_code == 0, good.output
    summary = json.loads(good.output)
    assert summary["combine"] == "cat" and summary["adapters"] == [str(a) for a in adapters]
    assert summary["lora_modules"] == 12
    card = (out / "README.md").read_text()  # the model card names every adapter and the method
    assert "by --combine cat, weights 0.7,-0.4" in card and "| adapter 2 |" in card
    assert f"The LoRA adapters `{adapters[0]}`, `{adapters[1]}`, combined, merged into" in card
    plan = runner.invoke(
        app, [str(base), *map(str, adapters), str(tmp_path / "dry"), "--dry-run", "--json"]
    )
    assert plan.exit_code == 0 and json.loads(plan.output)["combine"] == "cat"
    assert not (tmp_path / "dry").exists()


def _rewrite_adapter(source: Path, target: Path, change) -> Path:
    """A copy of an adapter folder with its tensors (and config) passed through `change`."""
    config, tensors = read_adapter(source)
    tensors, config = change(dict(tensors), dict(config))
    target.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, target / "adapter_model.safetensors")
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_adapters_of_different_bases_are_refused_naming_both_and_the_module(bf16_inputs, tmp_path):
    base, adapters = bf16_inputs
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def narrower(tensors, config):
        tensors[key] = tensors[key][:, :32]
        return tensors, config

    other = _rewrite_adapter(adapters[1], tmp_path / "other", narrower)
    with pytest.raises(AdapterMismatchError) as raised:
        merge(MergeOptions(base=base, adapter=[adapters[0], other], out=tmp_path / "out"))
    message = str(raised.value)
    assert str(adapters[0]) in message and str(other) in message
    assert "'model.layers.0.self_attn.q_proj'" in message and "(64, 64) vs (64, 32)" in message
    assert raised.value.exit_code == 5 and not (tmp_path / "out").exists()


def test_factor_methods_refuse_different_ranks_and_point_to_cat(fp32_inputs, tmp_path):
    base, adapters = fp32_inputs
    with pytest.raises(InvalidInputError, match=r"same rank.*r=8.*r=4.*--combine cat"):
        merge(
            MergeOptions(
                base=base, adapter=[adapters[0], adapters[2]], out=tmp_path / "o", combine="linear"
            )
        )


def test_dora_adapters_are_refused_in_a_combination(bf16_inputs, tmp_path):
    base, adapters = bf16_inputs

    def with_magnitudes(tensors, config):
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
        tensors[name] = torch.ones(64)
        return tensors, config

    dora = _rewrite_adapter(adapters[1], tmp_path / "dora", with_magnitudes)
    with pytest.raises(InvalidInputError, match="DoRA adapters cannot be combined"):
        merge(MergeOptions(base=base, adapter=[adapters[0], dora], out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_trainable_tokens_are_refused_in_a_combination(bf16_inputs, tmp_path):
    """Rows replaced outright cannot be summed with another adapter's: refused, named."""
    base, adapters = bf16_inputs

    def with_token_rows(tensors, config):
        key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
        tensors[key] = torch.zeros(2, 64)
        return tensors, {**config, "trainable_token_indices": [1, 2]}

    tokens = _rewrite_adapter(adapters[1], tmp_path / "tokens", with_token_rows)
    with pytest.raises(InvalidInputError, match=r"trainable tokens .* cannot be combined"):
        merge(MergeOptions(base=base, adapter=[adapters[0], tokens], out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dare_masks_keep_the_density_and_depend_only_on_seed_and_module():
    """Statistical check of the pure DARE step: about `density` of the entries survive,
    rescaled by 1/density; the same (seed, module) gives the same mask, another does not."""
    tensor = torch.full((200, 100), 3.0)
    first = randomly_pruned(tensor, 0.3, mask_generator_under_test(SEED, "m.q_proj"))
    again = randomly_pruned(tensor, 0.3, mask_generator_under_test(SEED, "m.q_proj"))
    other = randomly_pruned(tensor, 0.3, mask_generator_under_test(SEED + 1, "m.q_proj"))
    kept = first != 0
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(float(kept.double().mean()) - 0.3) < 0.01  # 20000 draws: sd 0.0032
    assert torch.equal(first[kept], torch.full_like(first[kept], 3.0 / 0.3))
    assert (
        mask_generator_under_test(SEED, "a").initial_seed()
        == mask_generator(SEED, "a").initial_seed()
    )


def test_one_adapter_with_a_weight_is_scaled_exactly(fp32_inputs, tmp_path):
    """--weights with a single adapter: W + w·s·B·A, within 0.5 ulp of float64 (fp32)."""
    base, adapters = fp32_inputs
    ours = run_merge(tmp_path, base, [adapters[1]], weights=[0.25])
    base_tensors, (deltas,) = read_safetensors_directory(base), exact_deltas([adapters[1]])
    assert len(deltas) == 8
    for name, delta in deltas.items():
        expected = base_tensors[name].double() + 0.25 * delta
        error_in_ulps = (ours[name].double() - expected).abs() / ulp(expected, torch.float32)
        assert float(error_in_ulps.max()) <= 0.5 + 1e-6, name


def test_dare_output_depends_on_the_seed_only(bf16_inputs, tmp_path):
    """The same --seed gives the same bytes with one or two worker threads; another seed
    gives another result."""
    base, adapters = bf16_inputs
    options = {"combine": "dare_ties", "density": 0.5, "weights": WEIGHTS}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_merge(tmp_path, base, adapters, seed=3, **options)
        torch.set_num_threads(2)
        double = run_merge(tmp_path, base, adapters, seed=3, **options)
        other = run_merge(tmp_path, base, adapters, seed=4, **options)
    finally:
        torch.set_num_threads(threads)
    assert differing(single, double) == {}
    assert len(differing(single, other)) == 12


@pytest.mark.parametrize(
    ("method", "options"), [("cat", {}), ("svd", {"svd_rank": 3}), ("ties_full", {"density": 0.5})]
)
def test_embedding_loras_combine_in_the_embedding_layout(fp32_inputs, tmp_path, method, options):
    """Adapters with an embed_tokens LoRA (lora_embedding_A (r, vocab), B (dim, r): the delta
    is (B @ A)ᵀ): the combination lands in the (vocab, dim) weight as the oracle lays it out."""
    base, adapters = fp32_inputs
    generator = torch.Generator().manual_seed(5)
    prefix = "base_model.model.model.embed_tokens"

    def with_embedding_lora(rank):
        def change(tensors, config):
            tensors[f"{prefix}.lora_embedding_A"] = torch.randn(rank, 256, generator=generator)
            tensors[f"{prefix}.lora_embedding_B"] = torch.randn(64, rank, generator=generator) / 50
            return tensors, config

        return change

    embedded = [
        _rewrite_adapter(adapters[i], tmp_path / f"embedding-{i}", with_embedding_lora(r))
        for i, r in ((0, 8), (1, 8))
    ]
    weights = (0.6, 0.9)
    ours = run_merge(tmp_path, base, embedded, combine=method, weights=weights, **options)
    base_tensors, deltas = read_safetensors_directory(base), exact_deltas(embedded)
    name = "model.embed_tokens.weight"
    present = [d[name] for d in deltas]
    assert present[0].shape == base_tensors[name].shape == (256, 64)
    if method == "cat":
        combined = weights[0] * present[0] + weights[1] * present[1]
    elif method == "svd":
        u, s, vh = torch.linalg.svd((weights[0] * present[0] + weights[1] * present[1]).T)
        combined = ((u[:, :3] * s[:3]) @ vh[:3]).T
    else:
        combined = paper_combination("ties", present, weights, 0.5, name.removesuffix(".weight"))
    expected = base_tensors[name].double() + combined
    error_in_ulps = (ours[name].double() - expected).abs() / ulp(expected, torch.float32)
    assert float(error_in_ulps.max()) <= 0.5 + 1e-3


def test_resume_fingerprint_covers_the_combination():
    """A --resume run with other weights, method or seed must not keep an earlier run's shards:
    the recipe is part of the fingerprint."""
    recipes = [
        build_combine_recipe(2, weights="0.7,0.3"),
        build_combine_recipe(2, weights="0.7,0.4"),
        build_combine_recipe(2, combine="dare_linear", density=0.5, seed=1),
        build_combine_recipe(2, combine="dare_linear", density=0.5, seed=2),
    ]
    prints = {merge_fingerprint([], [], "1.0", recipe.describe()) for recipe in recipes}
    assert len(prints) == len(recipes)
    assert merge_fingerprint([], [], "1.0", recipes[0].describe()) == merge_fingerprint(
        [], [], "1.0", build_combine_recipe(2, weights=[0.7, 0.3]).describe()
    )
