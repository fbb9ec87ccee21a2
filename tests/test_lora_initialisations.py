"""Adapters whose initialisation changed the base weights (issue 22, section 1).

PiSSA and OLoRA adapters are made by PEFT on a tiny bf16 model, "trained" (their A and B
moved by seeded noise, as training moves them) and saved three ways: as trained
(``init_lora_weights`` still ``"pissa"``/``"olora"``), the initial state (saved before
training with ``init_lora_weights=True``, as PEFT's docs do), and PEFT's converted adapter
(``path_initial_model_for_weight_conversion``). The oracles are PEFT's ``merge_and_unload``
of its converted adapter into the original base, PEFT's ``merge_and_unload`` of the
training model itself (whose base is the residual), and a float64 computation.

CorDA and LoRA-GA need a calibration or gradient pass before ``get_peft_model``; their
refusal depends on adapter_config.json alone, so for them (and ``pissa_niter_4``) the
config is the one PEFT's ``LoraConfig.save_pretrained`` writes, beside a real adapter's
weights. LoftQ's ``LoraConfig`` needs scipy, which the test extra does not install: its
config is PEFT's with ``loftq_config`` as ``LoftQConfig`` serialises it
(``{"loftq_bits": 4, "loftq_iter": 1}``), written as JSON.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_oracle import read_safetensors_directory, ulp
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_checkpoints import save_tiny_base_checkpoint, stable_seed
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.errors import (
    AdapterMismatchError,
    InvalidInputError,
    LoraMergeWarning,
    OutputError,
    UsageError,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8  # scale 2.0
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_checkpoint("llama", DTYPE, tmp_path_factory.mktemp("init-base"))


class Initialised:
    """One PEFT adapter made with a base-changing initialisation, in every form the tests use.

    Attributes:
        trained: the adapter as trained (init_lora_weights still the method's name).
        initial: the same adapter saved before training, init_lora_weights=True.
        converted: PEFT's converted adapter (rank 2r, init_lora_weights=True).
        residual: the base as training saw it (PEFT's unload() of the training model).
        peft_converted_merge: PEFT's merge_and_unload of ``converted`` into the original base.
        peft_training_merge: PEFT's merge_and_unload of the training model (residual base).
    """

    def __init__(self, base: Path, init: str, folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPE)
        config = LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init
        )
        peft_model = get_peft_model(model, config)
        self.initial = folder / "initial"
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(self.initial)
        peft_model.peft_config["default"].init_lora_weights = init
        generator = torch.Generator().manual_seed(stable_seed("train", init))
        with torch.no_grad():  # "training": A and B move away from their initial values
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(parameter.shape, generator=generator)
                    parameter.add_(0.05 * noise * parameter.abs().mean())
        self.trained = folder / "trained"
        peft_model.save_pretrained(self.trained)
        self.converted = folder / "converted"
        # PEFT rewrites the initial folder's config while converting: give it a copy.
        conversion_input = folder / "initial-for-peft"
        conversion_input.mkdir()
        for file in self.initial.iterdir():
            (conversion_input / file.name).write_bytes(file.read_bytes())
        peft_model.save_pretrained(
            self.converted, path_initial_model_for_weight_conversion=str(conversion_input)
        )
        self.peft_training_merge = {
            k: v.clone()
            for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()
        }
        self.residual = folder / "residual"
        peft_model.unload().save_pretrained(self.residual)
        original = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPE)
        converted = PeftModel.from_pretrained(original, self.converted)
        self.peft_converted_merge = dict(converted.merge_and_unload().state_dict())


@pytest.fixture(scope="module", params=["pissa", "olora"])
def initialised(request, tiny_base: Path, tmp_path_factory) -> Initialised:
    return Initialised(tiny_base, request.param, tmp_path_factory.mktemp(request.param))


def _merge(base: Path, adapter: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, **options))
    return read_safetensors_directory(out)


def test_initial_adapter_is_peft_conversion_merged_by_peft(
    initialised: Initialised, tiny_base: Path, tmp_path: Path
) -> None:
    """--initial-adapter merges s·(B·A - B0·A0) into the original base: the same bits as PEFT
    merging its own converted adapter, for every tensor."""
    ours = _merge(
        tiny_base, initialised.trained, tmp_path / "out", initial_adapter=initialised.initial
    )
    peft = initialised.peft_converted_merge
    assert set(ours) == set(peft)
    for key, expected in peft.items():
        assert torch.equal(ours[key], expected), key


def test_initial_adapter_is_within_one_ulp_of_float64(
    initialised: Initialised, tiny_base: Path, tmp_path: Path
) -> None:
    """Against W + s·(B·A - B0·A0) in float64: the float32 evaluation errs by far less than
    half a bf16 ulp (r = 8 products of float32 values, |error| <= ~10 float32 ulps of the
    terms, 2^-16 of a bf16 ulp), so the one rounding lands on a neighbour of the exact value:
    within one bf16 ulp of it, everywhere."""
    ours = _merge(
        tiny_base, initialised.trained, tmp_path / "out", initial_adapter=initialised.initial
    )
    base = read_safetensors_directory(tiny_base)
    trained = read_safetensors_directory(initialised.trained)
    initial = read_safetensors_directory(initialised.initial)
    checked = 0
    for key, a in trained.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        exact = base[weight].double() + ALPHA / RANK * (
            trained[b_key].double() @ a.double() - initial[b_key].double() @ initial[key].double()
        )
        error = (ours[weight].double() - exact).abs()
        assert bool((error <= ulp(exact, DTYPE)).all()), weight
        checked += 1
    assert checked == 2 * len(TARGETS)


def test_residual_base_is_peft_merge_of_the_training_model(
    initialised: Initialised, tmp_path: Path
) -> None:
    """--residual-base with the residual model PEFT's unload() gives: the same bits as PEFT's
    merge_and_unload of the model that trained."""
    ours = _merge(initialised.residual, initialised.trained, tmp_path / "out", residual_base=True)
    for key, expected in initialised.peft_training_merge.items():
        assert torch.equal(ours[key], expected), key


def test_converted_adapter_merges_as_it_is(
    initialised: Initialised, tiny_base: Path, tmp_path: Path
) -> None:
    """PEFT's converted adapter (init_lora_weights true) needs no option: the same bits again."""
    ours = _merge(tiny_base, initialised.converted, tmp_path / "out")
    for key, expected in initialised.peft_converted_merge.items():
        assert torch.equal(ours[key], expected), key


def _decomposition_error_bound(weight: torch.Tensor, init: str) -> float:
    """How far a float32 recomputation of scale·B0·A0 may be from PEFT's, elementwise.

    Both are backward-stable float32 decompositions of the same W (LAPACK may round
    differently on another machine): the computed factors are those of W + E with
    ||E|| <= c·sqrt(n)·eps32·||W|| (c = 4 here). PiSSA's rank-r part then moves by at most
    ||E||·(1 + 2·s1 / (s(r) - s(r+1))) (Davis-Kahan on the top-r subspace); OLoRA's,
    Q_r·Q_rᵀ·W, by at most ||E||·(1 + 2·κ(W[:, :r])) (the subspace of W's first r columns)."""
    w = weight.double()
    n = max(w.shape)
    singular = torch.linalg.svdvals(w)
    error = 4 * n**0.5 * torch.finfo(torch.float32).eps * float(singular[0])
    if init == "pissa":
        return error * (1 + 2 * float(singular[0] / (singular[RANK - 1] - singular[RANK])))
    return error * (1 + 2 * float(torch.linalg.cond(w[:, :RANK])))


def test_recomputed_initial_state_merges_the_trained_model(
    initialised: Initialised, tiny_base: Path, tmp_path: Path
) -> None:
    """--recompute-initial redoes PEFT's float32 SVD (PiSSA) or QR (OLoRA) of each weight and
    merges W + s·B·A - s·B0·A0. The model that trained is W_res + s·B·A, with W_res = W -
    s·B0·A0 rounded to bf16 by PEFT: so the merge is within half a bf16 ulp of W_res (that
    rounding), half an ulp of the output (ours) and the decomposition's own error
    (:func:`_decomposition_error_bound`) of that model in float64, elementwise.

    Where it differs from --initial-adapter (PEFT's conversion): PEFT computes W_res with
    the float32 B0, A0 and then casts the adapter to the base's dtype before training
    (``_move_adapter_to_device_of_base_layer``), so the initial adapter it saves holds
    B0, A0 rounded to bf16; subtracting those leaves s·(B0·A0 - bf16(B0)·bf16(A0)) in the
    merge, which the recomputation does not. The mean errors are printed."""
    ours = _merge(tiny_base, initialised.trained, tmp_path / "out", recompute_initial=True)
    base = read_safetensors_directory(tiny_base)
    residual = read_safetensors_directory(initialised.residual)
    trained = read_safetensors_directory(initialised.trained)
    init = initialised.trained.parent.name.rstrip("0123456789")
    errors = {"recompute": 0.0, "initial-adapter (PEFT conversion)": 0.0}
    for key, a in trained.items():
        if ".lora_A." not in key:
            continue
        weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = trained[key.replace(".lora_A.", ".lora_B.")]
        exact = residual[weight].double() + ALPHA / RANK * (b.double() @ a.double())
        bound = (
            0.5 * ulp(residual[weight], DTYPE)
            + 0.5 * ulp(ours[weight], DTYPE)
            + _decomposition_error_bound(base[weight], init)
        )
        assert bool(((ours[weight].double() - exact).abs() <= bound).all()), weight
        errors["recompute"] += float((ours[weight].double() - exact).abs().mean())
        converted = initialised.peft_converted_merge[weight].double()
        errors["initial-adapter (PEFT conversion)"] += float((converted - exact).abs().mean())
    print(f"{init}: mean |merge - trained model| summed over weights: {errors}")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "recomputed from BASE (--recompute-initial)" in card


def test_initial_adapter_recorded_in_model_card(
    initialised: Initialised, tiny_base: Path, tmp_path: Path
) -> None:
    _merge(tiny_base, initialised.trained, tmp_path / "out", initial_adapter=initialised.initial)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "B0 @ A0" in card and "--initial-adapter" in card


# Refusals: what marks an unconverted adapter, and the one line the user gets.

# init_lora_weights -> what the refusal names, and whether it offers --recompute-initial.
UNCONVERTED = {
    "pissa": ("PiSSA", True),
    "pissa_niter_4": ("PiSSA (fast SVD)", False),
    "olora": ("OLoRA", True),
    "corda": ("CorDA", False),
    "lora_ga": ("LoRA-GA", False),
}


@pytest.fixture(scope="module")
def plain_weights(tiny_base: Path, tmp_path_factory) -> Path:
    """A real PEFT adapter's weights file (the refusals read only the config)."""
    folder = tmp_path_factory.mktemp("plain")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=DTYPE)
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder / "adapter_model.safetensors"


def _adapter_with_config(folder: Path, weights: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _peft_config(init: str | bool) -> dict:
    """adapter_config.json as PEFT writes it for this initialisation."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init)
    folder_config = config.to_dict()
    # save_pretrained writes sets as lists
    return json.loads(json.dumps(folder_config, default=sorted))


@pytest.mark.parametrize("init", sorted(UNCONVERTED))
def test_unconverted_adapter_refused(
    init: str, tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    adapter = _adapter_with_config(tmp_path / "adapter", plain_weights, _peft_config(init))
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError) as refusal:
        merge(MergeOptions(base=tiny_base, adapter=adapter, out=out, quiet=True))
    message = str(refusal.value)
    name, recomputable = UNCONVERTED[init]
    assert f"init_lora_weights={init!r}" in message and f"this {name} adapter" in message
    assert "count its initial state twice" in message
    for remedy in (
        "path_initial_model_for_weight_conversion",
        "--initial-adapter",
        "--residual-base",
    ):
        assert remedy in message
    assert ("--recompute-initial" in message) == recomputable
    assert "\n" not in message
    assert not out.exists()


def _loftq_config() -> dict:
    config = _peft_config(True)
    config.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    return config


def test_loftq_refused_unless_base_is_its_backbone(
    tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    """PEFT's LoftQ replaces each weight by its quantized Q and tells users to load that
    backbone with the adapter: a merge needs it as BASE (--residual-base); subtracting
    B0·A0 from W would not give Q + s·B·A, so --initial-adapter is refused too."""
    adapter = _adapter_with_config(tmp_path / "loftq", plain_weights, _loftq_config())
    with pytest.raises(InvalidInputError, match="LoftQ's quantized backbone"):
        merge(MergeOptions(base=tiny_base, adapter=adapter, out=tmp_path / "a", quiet=True))
    with pytest.raises(InvalidInputError, match="only approximates W"):
        merge(
            MergeOptions(
                base=tiny_base, adapter=adapter, out=tmp_path / "b", initial_adapter=adapter
            )
        )
    merge(
        MergeOptions(
            base=tiny_base, adapter=adapter, out=tmp_path / "c", residual_base=True, quiet=True
        )
    )
    assert "LoftQ adapter merged into BASE as given" in (tmp_path / "c" / "README.md").read_text()


@pytest.mark.parametrize("init", ["eva", "orthogonal", True])
def test_initialisations_that_keep_the_base_merge_normally(
    init: str | bool, tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    adapter = _adapter_with_config(tmp_path / "adapter", plain_weights, _peft_config(init))
    merge(MergeOptions(base=tiny_base, adapter=adapter, out=tmp_path / "out", quiet=True))
    assert (tmp_path / "out" / "config.json").is_file()


def test_recompute_refused_where_not_deterministic(
    tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    config = _peft_config("pissa_niter_4")
    adapter = _adapter_with_config(tmp_path / "adapter", plain_weights, config)
    with pytest.raises(InvalidInputError, match="random generator whose state"):
        merge(
            MergeOptions(
                base=tiny_base, adapter=adapter, out=tmp_path / "out", recompute_initial=True
            )
        )


def test_residual_base_refused_for_a_plain_adapter(
    tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    adapter = _adapter_with_config(tmp_path / "adapter", plain_weights, _peft_config(False))
    with pytest.raises(InvalidInputError, match="merge it without --residual-base"):
        merge(
            MergeOptions(base=tiny_base, adapter=adapter, out=tmp_path / "out", residual_base=True)
        )


def test_initial_adapter_must_match(
    initialised: Initialised, tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    """Another rank, or another adapter's modules, is not this adapter's initial state."""
    other_rank = _peft_config(True) | {"r": 2 * RANK}
    other = _adapter_with_config(tmp_path / "other", plain_weights, other_rank)
    with pytest.raises(InvalidInputError, match="has r=8 but"):
        merge(
            MergeOptions(
                base=tiny_base,
                adapter=initialised.trained,
                out=tmp_path / "a",
                initial_adapter=other,
            )
        )
    fewer = _peft_config(True)
    missing = _adapter_with_config(tmp_path / "fewer", plain_weights, fewer)
    tensors = read_safetensors_directory(missing)
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in tensors.items() if "down_proj" not in k},
        missing / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterMismatchError, match="down_proj"):
        merge(
            MergeOptions(
                base=tiny_base,
                adapter=initialised.trained,
                out=tmp_path / "b",
                initial_adapter=missing,
            )
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_two_answers_are_a_usage_error(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="give one of them"):
        merge(
            MergeOptions(
                base=tiny_base,
                adapter=tmp_path,
                out=tmp_path / "out",
                initial_adapter=tmp_path,
                residual_base=True,
            )
        )


def test_command_line_refusal_is_exit_4_and_one_line(
    tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    adapter = _adapter_with_config(tmp_path / "adapter", plain_weights, _peft_config("pissa"))
    run = subprocess.run(
        [sys.executable, "-m", "lora_merge", str(tiny_base), str(adapter), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 4
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error: ")
    assert "PiSSA" in lines[0]


def test_unknown_initialisation_is_merged_with_a_warning(
    tiny_base: Path, plain_weights: Path, tmp_path: Path
) -> None:
    config = _peft_config(True) | {"init_lora_weights": "a_newer_method"}
    adapter = _adapter_with_config(tmp_path / "adapter", plain_weights, config)
    with pytest.warns(LoraMergeWarning, match="'a_newer_method', an initialisation lora-merge"):
        merge(MergeOptions(base=tiny_base, adapter=adapter, out=tmp_path / "out", quiet=True))
    assert (tmp_path / "out" / "config.json").is_file()


def test_out_may_not_lie_inside_the_initial_adapter(
    initialised: Initialised, tiny_base: Path
) -> None:
    """--overwrite replaces OUT: it may not be (or be inside) the initial adapter's folder."""
    before = {p.name: p.read_bytes() for p in initialised.initial.iterdir()}
    with pytest.raises(OutputError, match="lies inside the input folder"):
        merge(
            MergeOptions(
                base=tiny_base,
                adapter=initialised.trained,
                out=initialised.initial,
                initial_adapter=initialised.initial,
                overwrite=True,
            )
        )
    assert {p.name: p.read_bytes() for p in initialised.initial.iterdir()} == before
