"""IA3, LoHa and LoKr adapters written by PEFT, merged by lora-merge, checked against PEFT.

The oracles:
- bfloat16 bases: PEFT's own ``merge_and_unload`` rounds once (its delta or its
  product is float32, added to the weight and rounded to bfloat16), and so does
  lora-merge: every tensor must be PEFT's, bit for bit. The same for ``--unmerge``
  against PEFT's ``unmerge_adapter``.
- float32 bases: IA3's product is rounded once by PEFT too (bit for bit). LoHa and
  LoKr round PEFT's float32 products before the sum; lora-merge computes in float64
  and rounds once. The reference is PEFT's merge of the same model in float64, y;
  ours must be within half a float32 ulp of it plus twice the float64 error bound
  of either computation (see ``_float64_error_bound``), and never further from y
  than PEFT's float32 merge is (plus that same bound).
- the merged model's logits against the unmerged PEFT model's, within the measured
  noise of ``tiny_checkpoints.unmerged_tolerance``.

PEFT initialises IA3's vectors to ones and LoHa's/LoKr's second factors to zero:
every adapter tensor is redrawn from a seeded generator before saving, as training
would move it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_oracle import read_safetensors_directory, ulp
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    OFTConfig,
    PeftModel,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from safetensors.torch import save_file
from tiny_checkpoints import (
    float64_copy,
    prompt_logits,
    stable_seed,
    unmerged_tolerance,
)
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.api import preview_merge
from lora_merge.errors import InvalidInputError

LINEAR_TARGETS = ["q_proj", "v_proj", "down_proj"]
# Tensor names of the tuners' parameters (PEFT's ParameterDict names).
TUNER_PARAMETERS = ("ia3_l", "hada_", "lokr_", "lora_A", "lora_B", "lora_E", "vera_lambda")
# "vera" saves its shared A and B; "vera-seed" does not, and is merged with them regenerated
# from projection_prng_key.
LLAMA_TUNERS = ["adalora", "ia3", "loha", "lokr", "vera", "vera-seed"]
# AdaLoRA's rank_pattern (as its RankAllocator leaves it: the ranks kept, as boolean masks,
# by ``<module>.lora_E``): layer 0's q_proj keeps 3 of its 6, layer 1's v_proj none (it is
# merged as a zero delta: one adapted weight fewer changes).
ADALORA_MASKS = {
    "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True, False, False],
    "model.layers.1.self_attn.v_proj.lora_E": [False] * 6,
}
UNCHANGED_ADAPTED = {"adalora": 1}
# The largest rank of each adapter's products (see _float64_error_bound): its r, rank_pattern
# and AdaLoRA's init_r in _linear_config.
LARGEST_RANK = {"adalora": 6, "ia3": 1, "loha": 4, "lokr": 8, "vera": 8, "vera-seed": 8}
UNIT_ROUNDOFF_64 = 2.0**-53


def _linear_config(tuner: str):
    if tuner == "adalora":
        return AdaLoraConfig(
            init_r=6, target_r=2, lora_alpha=8, target_modules=LINEAR_TARGETS, total_step=10
        )
    if tuner.startswith("vera"):
        return VeraConfig(
            r=8,
            target_modules=LINEAR_TARGETS,
            save_projection=tuner == "vera",
            projection_prng_key=stable_seed(tuner) % 1000,
        )
    if tuner == "ia3":  # down_proj scales its inputs (columns), q/v their outputs (rows)
        return IA3Config(target_modules=LINEAR_TARGETS, feedforward_modules=["down_proj"])
    if tuner == "loha":
        return LoHaConfig(
            r=4,
            alpha=6,
            target_modules=LINEAR_TARGETS,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
        )
    # LoKr on (64, 64) and (64, 128) weights: r=2 makes W1 and W2 low-rank; v_proj's r=8 makes
    # both whole, down_proj's r=6 a whole W1 beside a low-rank W2 (PEFT's use_w1/use_w2 rules).
    return LoKrConfig(
        r=2,
        alpha=3,
        target_modules=LINEAR_TARGETS,
        decompose_both=True,
        rank_pattern={"v_proj": 8, "down_proj": 6},
    )


@torch.no_grad()
def _redraw_adapter(model: torch.nn.Module, seed: int) -> None:
    """Every tuner parameter from a seeded generator: IA3 near 1, the others ~N(0, 0.2^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if not any(part in name for part in TUNER_PARAMETERS):
            continue
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        value = 1.0 + 0.2 * noise if "ia3_l" in name else 0.2 * noise
        parameter.copy_(value.to(parameter.dtype))


def _save_adapter(
    model: torch.nn.Module, config, directory: Path, seed: int, masks: dict | None = None
) -> Path:
    peft_model = get_peft_model(model, config)
    _redraw_adapter(peft_model, seed)
    if masks:  # AdaLoRA pruned as training prunes it: save keeps the ranks the masks keep
        config.rank_pattern = dict(masks)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory, tiny_base_checkpoint):
    """Tiny Llama bases (float32, bfloat16) and an IA3, a LoHa and a LoKr adapter on them."""
    root = tmp_path_factory.mktemp("tuners")
    base = tiny_base_checkpoint("llama", torch.float32)
    adapters = {}
    for tuner in LLAMA_TUNERS:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        masks = ADALORA_MASKS if tuner == "adalora" else None
        seed = stable_seed("tuner", tuner)
        adapters[tuner] = _save_adapter(model, _linear_config(tuner), root / tuner, seed, masks)
    return {torch.float32: base, torch.bfloat16: tiny_base_checkpoint("llama", torch.bfloat16)}, (
        adapters
    )


def _peft_model(base: Path, adapter: Path, dtype: torch.dtype) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).eval()


def _ours(base: Path, adapter: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, **options))
    return read_safetensors_directory(out)


@torch.no_grad()
def _restore_saved_values(peft_model: PeftModel, adapter: Path) -> None:
    """Give PEFT's AdaLoRA layers the values saved in the adapter file.

    On a bf16 base PEFT rounds a pruned layer's A, B and E to bfloat16 when it loads them:
    ``resize_modules_by_rank_pattern`` recreates the layer in the base's dtype, after the
    float32 autocast, and the saved float32 values are copied into it. lora-merge merges the
    saved values; PEFT's merge of those same values is the oracle.
    """
    saved = read_safetensors_directory(adapter)
    for name, parameter in peft_model.named_parameters():
        key = name.replace(".default", "")
        if key in saved:
            parameter.data = saved[key].to(torch.float32)


def _unwrapped(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A tensor of a PEFT model's state dict by its base name (a wrapped layer's is under
    ``base_layer``)."""
    wrapped = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
    return state[wrapped] if wrapped in state else state[name]


@pytest.mark.parametrize("tuner", LLAMA_TUNERS)
def test_bfloat16_merge_and_unmerge_are_peft_bit_for_bit(llama_adapters, tmp_path, tuner):
    """A bf16 base: every merged tensor is PEFT's merge_and_unload's, and --unmerge of our
    output is PEFT's unmerge_adapter of its merged model, bit for bit."""
    bases, adapters = llama_adapters
    base = bases[torch.bfloat16]
    ours = _ours(base, adapters[tuner], tmp_path / "merged")
    original = read_safetensors_directory(base)
    peft_model = _peft_model(base, adapters[tuner], torch.bfloat16)
    if tuner == "adalora":
        _restore_saved_values(peft_model, adapters[tuner])
    peft_model.merge_adapter()
    merged_state = {k: v.clone() for k, v in peft_model.base_model.model.state_dict().items()}
    assert sorted(ours) == sorted(original)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, _unwrapped(merged_state, name)), name
    changed = [name for name in ours if not torch.equal(ours[name], original[name])]
    adapted = 2 * len(LINEAR_TARGETS) - UNCHANGED_ADAPTED.get(tuner, 0)
    assert len(changed) == adapted, changed  # the adapted weights

    unmerged = _ours(tmp_path / "merged", adapters[tuner], tmp_path / "unmerged", unmerge=True)
    peft_model.unmerge_adapter()
    restored = peft_model.base_model.model.state_dict()
    for name, tensor in unmerged.items():
        assert torch.equal(tensor, _unwrapped(restored, name)), name


def _float64_reference(base: torch.nn.Module, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge of the float32 base and adapter, carried out in float64."""
    peft_model = PeftModel.from_pretrained(base, adapter).eval().double()
    return peft_model.merge_and_unload().state_dict()


def _delta_magnitudes(base: torch.nn.Module, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's float64 delta of the adapter with every tensor replaced by its absolute value:
    for LoHa ``|s|(|W1a||W1b|)⊙(|W2a||W2b|)``, for LoKr ``|s|kron(|W1a||W1b|, ...)``: the sum
    of absolute terms that bounds each element's rounding error."""
    peft_model = PeftModel.from_pretrained(base, adapter).eval().double()
    magnitudes = {}
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if any(part in name for part in TUNER_PARAMETERS):
                parameter.abs_()
        for name, buffer in peft_model.named_buffers():  # VeRA's shared A and B
            if "vera_A" in name or "vera_B" in name:
                buffer.abs_()
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                magnitudes[f"{name}.weight"] = module.get_delta_weight("default").abs()
    return magnitudes


def _float64_error_bound(tuner: str, products: int, terms: torch.Tensor) -> torch.Tensor:
    """What float64 arithmetic can move an element of ``W + delta`` away from exact.

    ``terms`` is ``|W| + |delta|`` with every factor's absolute value (each product's sum
    of absolute terms). A sum of n products is off by at most n·u of its absolute terms
    (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5, first order): n = r
    for a matrix product of rank r, r² for a CP einsum over two rank indices. LoHa
    multiplies two such sums, then the Hadamard product, the scale and the sum each add u:
    (2n + 3)·u. LoKr's W1 and W2 (each a product, or whole: n bounds both), the Kronecker
    product, the scale and the sum: the same (2n + 3)·u. AdaLoRA's A * E (u), the rank-n
    product (n·u), the scale, the division by ranknum + 1e-5 (itself rounded: 2u) and the
    sum: (n + 5)·u. The float32 scale is a float64 number exactly, in PEFT's float64 merge
    and in ours.
    """
    unit_errors = {
        "loha": 2 * products + 3,
        "lokr": 2 * products + 3,
        "adalora": products + 5,
        "vera": products + 3,
    }
    return unit_errors[tuner] * UNIT_ROUNDOFF_64 * terms


def _check_against_float64(
    tuner: str,
    ours: dict[str, torch.Tensor],
    load_base,
    adapter: Path,
    products: int,
    adapted: int,
) -> None:
    """IA3: PEFT's float32 merge bit for bit. LoHa, LoKr: within half an ulp of PEFT's float64
    merge plus twice the float64 bound, and no further from it than PEFT's float32 merge."""
    peft32 = PeftModel.from_pretrained(load_base(), adapter).eval().merge_and_unload()
    peft32 = peft32.state_dict()
    assert set(ours) <= set(peft32)  # (PEFT's state dict also lists a tied head)
    if tuner == "ia3":
        for name, tensor in ours.items():
            assert torch.equal(tensor, peft32[name]), name
        return
    exact = _float64_reference(load_base(), adapter)
    magnitudes = _delta_magnitudes(load_base(), adapter)
    assert len(magnitudes) == adapted
    for name, tensor in ours.items():
        if name not in magnitudes:
            assert torch.equal(tensor, peft32[name]), name
            continue
        reference = exact[name]
        bound = _float64_error_bound(tuner, products, reference.abs() + magnitudes[name])
        error = (tensor.double() - reference).abs()
        assert (error <= 0.5 * ulp(reference, torch.float32) + 2 * bound).all(), name
        assert (error <= (peft32[name].double() - reference).abs() + 2 * bound).all(), name


@pytest.mark.parametrize("tuner", LLAMA_TUNERS)
def test_float32_merge_is_correctly_rounded_and_no_worse_than_peft(llama_adapters, tmp_path, tuner):
    """A float32 base: IA3 is PEFT's bit for bit (one product, rounded once by both). AdaLoRA,
    LoHa and LoKr are within half an ulp of PEFT's float64 merge (plus the float64 bound), and never
    further from it than PEFT's own float32 merge."""
    bases, adapters = llama_adapters
    base, adapter = bases[torch.float32], adapters[tuner]
    ours = _ours(base, adapter, tmp_path / "merged")
    _check_against_float64(
        tuner.split("-")[0],
        ours,
        lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        adapter,
        products=LARGEST_RANK[tuner],
        adapted=2 * len(LINEAR_TARGETS),
    )


@pytest.mark.parametrize("tuner", LLAMA_TUNERS)
def test_merged_logits_match_the_unmerged_peft_model(llama_adapters, tmp_path, tuner):
    """The merged float32 model computes what PEFT's unmerged model computes, within the
    unmerged model's own measured distance from float64 (tiny_checkpoints.NOISE_MULTIPLE)."""
    bases, adapters = llama_adapters
    base = bases[torch.float32]
    _ours(base, adapters[tuner], tmp_path / "merged")
    peft_model = _peft_model(base, adapters[tuner], torch.float32)
    unmerged = prompt_logits(peft_model)
    reference = prompt_logits(float64_copy(peft_model), torch.float64)
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    merged = prompt_logits(merged_model)
    tolerance = unmerged_tolerance(unmerged, reference, torch.float32)
    assert float((merged.double() - unmerged.double()).abs().max()) <= tolerance
    # The adapter matters: the base alone is far off.
    plain = prompt_logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    assert float((plain.double() - unmerged.double()).abs().max()) > 100 * tolerance


class TinyConvolutions(torch.nn.Module):
    """A Conv1d, a 3x3 Conv2d and a 1x1 Conv2d: the layers LoHa, LoKr and IA3 wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = torch.nn.Conv1d(4, 8, 3)
        self.conv2d = torch.nn.Conv2d(4, 8, 3)
        self.pointwise = torch.nn.Conv2d(8, 6, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = [self.conv1d(inputs["1d"]), self.pointwise(self.conv2d(inputs["2d"]))]
        return torch.cat([output.flatten() for output in outputs])


CONV_INPUTS = {
    "1d": torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1)),
    "2d": torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(2)),
}
# (name, PEFT config, its largest sum of products (see _float64_error_bound), layers adapted)
CONV_CASES = {
    # IA3 wraps Conv2d (not Conv1d): the 3x3 one scales its inputs, the 1x1 its outputs.
    "ia3": (
        IA3Config(target_modules=["conv2d", "pointwise"], feedforward_modules=["conv2d"]),
        1,
        2,
    ),
    "loha": (LoHaConfig(r=3, alpha=4, target_modules=["conv1d", "conv2d", "pointwise"]), 3, 3),
    # The CP (Tucker) form: t1, t2 (r, r, k, k') for every kernel larger than 1x1.
    "loha-cp": (
        LoHaConfig(
            r=3,
            alpha=4,
            target_modules=["conv1d", "conv2d", "pointwise"],
            use_effective_conv2d=True,
        ),
        9,
        3,
    ),
    # r=1 keeps W2 factored (PEFT's use_w2 is r >= max(b, d) / 2), hence in CP form. Not on
    # the Conv1d: PEFT's own LoKr fails there (torch.kron on its CP W2's strides).
    "lokr-cp": (
        LoKrConfig(r=1, alpha=3, target_modules=["conv2d", "pointwise"], use_effective_conv2d=True),
        1,
        2,
    ),
}


def _conv_model() -> TinyConvolutions:
    torch.manual_seed(0)
    return TinyConvolutions()


@pytest.fixture(scope="module")
def conv_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuner-conv")
    base = root / "base"
    base.mkdir()
    save_file(_conv_model().state_dict(), base / "model.safetensors", metadata={"format": "pt"})
    adapters = {
        name: _save_adapter(_conv_model(), config, root / name, stable_seed("conv", name))
        for name, (config, _, _) in CONV_CASES.items()
    }
    return base, adapters


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_convolutions_match_peft(conv_adapters, tmp_path, case):
    """Conv1d and Conv2d (and LoHa's and LoKr's CP forms): float32 merges checked as the
    Llama ones are, and the merged model computes what the unmerged PEFT model computes."""
    base, adapters = conv_adapters
    _, products, adapted = CONV_CASES[case]
    ours = _ours(base, adapters[case], tmp_path / "merged")
    tuner = case.split("-")[0]
    if case.endswith("-cp"):
        saved = read_safetensors_directory(adapters[case])
        assert any(".hada_t1" in key or ".lokr_t2" in key for key in saved)
    _check_against_float64(tuner, ours, _conv_model, adapters[case], products, adapted)

    peft_model = PeftModel.from_pretrained(_conv_model(), adapters[case]).eval()
    merged_model = _conv_model()
    merged_model.load_state_dict(ours)
    with torch.no_grad():
        unmerged, merged = peft_model(CONV_INPUTS), merged_model(CONV_INPUTS)
        reference = float64_copy(peft_model)({k: v.double() for k, v in CONV_INPUTS.items()})
        plain = _conv_model()(CONV_INPUTS)
    tolerance = unmerged_tolerance(unmerged, reference, torch.float32)
    assert float((merged.double() - unmerged.double()).abs().max()) <= tolerance
    assert float((plain.double() - unmerged.double()).abs().max()) > 100 * tolerance


def test_card_dry_run_and_json_name_the_type(llama_adapters, tmp_path):
    """--dry-run and preview count the modules by type and layer; the model card and the
    --json summary say which formula was merged; --verify passes."""
    bases, adapters = llama_adapters
    base = bases[torch.bfloat16]
    preview = preview_merge(MergeOptions(base=base, adapter=adapters["loha"], out=tmp_path / "o"))
    assert preview.adapter_type == "LoHa"
    assert preview.lora_modules_by_layer == {"loha-linear": 2 * len(LINEAR_TARGETS)}
    assert preview.scales == {"1.5": 2, "3": 2, "0.75": 2}  # alpha/r: 6/4; 6/2 (v); 3/4 (down)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_merge",
            str(base),
            str(adapters["ia3"]),
            str(tmp_path / "m"),
            "--verify",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["lora_modules_by_layer"] == {"ia3-linear": 2 * len(LINEAR_TARGETS)}
    card = (tmp_path / "m" / "README.md").read_text()
    assert "W * l per output row" in card and "The IA3 adapter" in card


def test_types_that_change_no_weight_are_refused_as_such(llama_adapters, tmp_path):
    """A prompt-tuning adapter PEFT saved: exit 4, saying the type cannot be merged into
    weights (not a generic "LoRA only"); OUT is not created."""
    bases, _ = llama_adapters
    base = bases[torch.float32]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(model, config).save_pretrained(tmp_path / "prompt")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_merge",
            str(base),
            str(tmp_path / "prompt"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 4
    assert "cannot be merged into weights" in result.stderr and "prompt tuning" in result.stderr
    assert not (tmp_path / "out").exists()


def test_several_adapters_of_these_types_are_refused(llama_adapters, tmp_path):
    """--combine of an IA3 and a LoHa adapter: exit 4 naming the type; OUT not created."""
    bases, adapters = llama_adapters
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_merge",
            str(bases[torch.float32]),
            str(adapters["ia3"]),
            str(adapters["loha"]),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 4, result.stderr
    assert "IA3 adapter" in result.stderr and "LoRA adapters only" in result.stderr
    assert not (tmp_path / "out").exists()


# transformers' Conv1D (GPT-2), which stores weights (in, out): PEFT's fan_in_fan_out. c_attn
# is (64, 192), the attention's c_proj square (told apart by the architecture table).
GPT2_CASES = {
    "adalora": (
        lambda: AdaLoraConfig(
            init_r=4,
            target_r=2,
            lora_alpha=6,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
            total_step=10,
        ),
        4,
    ),
    "vera": (
        lambda: VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        4,
    ),
    # The MLP's c_proj scales its inputs (rows of a Conv1D weight), the others their outputs
    # (columns) and their biases. As regexes: PEFT matches a string against the whole name.
    "ia3": (
        lambda: IA3Config(
            target_modules=r".*\.(c_attn|c_proj)",
            feedforward_modules=r".*\.mlp\.c_proj",
            fan_in_fan_out=True,
        ),
        1,
    ),
}


@pytest.mark.parametrize("tuner", list(GPT2_CASES))
def test_gpt2_conv1d_layers_match_peft(tiny_base_checkpoint, tmp_path, tuner):
    """AdaLoRA and IA3 on GPT-2's Conv1D weights, as the Llama ones are checked."""
    base = tiny_base_checkpoint("gpt2", torch.float32)
    make_config, rank = GPT2_CASES[tuner]
    config = make_config()
    masks = {"transformer.h.0.attn.c_attn.lora_E": [True, False, True, False]}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapter = _save_adapter(model, config, tmp_path / tuner, stable_seed("gpt2", tuner), masks)
    ours = _ours(base, adapter, tmp_path / "merged")
    load = lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # noqa: E731
    # c_attn, the attention's and the MLP's c_proj, in both layers
    _check_against_float64(tuner, ours, load, adapter, rank, adapted=6)


# OFT, as PEFT 0.21 saves it. (name -> config, and whether the Cayley transform is the series)
OFT_CASES = {
    # PEFT 0.21's default: the Cayley transform by a 5-term Neumann series.
    "neumann": (lambda: OFTConfig(r=0, oft_block_size=16, target_modules=LINEAR_TARGETS), True),
    # COFT: generators above eps / sqrt(blocks) projected back (q_proj's 4 blocks: radius 0.8;
    # down_proj's 8: 0.57; the redrawn blocks' norms are about 0.77: some are projected).
    "coft": (
        lambda: OFTConfig(
            r=0, oft_block_size=16, target_modules=LINEAR_TARGETS, coft=True, eps=1.6
        ),
        True,
    ),
    # One block shared by all, and the exact Cayley transform (a linear solve).
    "shared-exact": (
        lambda: OFTConfig(
            r=0,
            oft_block_size=8,
            target_modules=LINEAR_TARGETS,
            block_share=True,
            use_cayley_neumann=False,
        ),
        False,
    ),
}
OFT_GENERATOR_SCALE = 0.05


@torch.no_grad()
def _save_oft(model: torch.nn.Module, config, directory: Path, seed: int) -> Path:
    """An OFT adapter with generators ~N(0, 0.05²) (PEFT starts them at zero: R = I)."""
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in peft_model.named_parameters():
        if "oft_R" in name:
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(OFT_GENERATOR_SCALE * noise)
    peft_model.save_pretrained(directory)
    return directory


def _rotation_error_bound(module, neumann: bool, terms: int) -> torch.Tensor:
    """A bound on every element of |R̂ - R|, R̂ PEFT's float64 rotation (block diagonal).

    Neumann series with m terms (``_cayley_batch``): Q^k is k - 1 products of b terms, each
    off by at most b·u of its absolute terms (first order), so |fl(Q^k) - Q^k| ≤ (k-1)·b·u·|Q|^k
    elementwise; the m - 1 additions add at most m·u of the sum of absolute terms. COFT's
    projection scales Q by a factor computed with a norm of b² squares, a square root and a
    division: a relative change of at most (b² + 4)·u, which moves each Q^k term by k times
    that. All of it is at most (m·b + m + m·(b² + 4))·u·N with
    N = I + 2Σ|Q|^k + |Q|^(m-1), the series of absolute values.

    Exact form, R = (I - Q)(I + Q)⁻¹ by a linear solve: a posteriori. With D = R̂ - R,
    D(I + Q) = R̂(I + Q) - (I - Q) = F, computed in float64 within (b + 2)·u·(|R̂||I + Q| + |I - Q|);
    and ‖(I + Q)⁻¹‖₂ ≤ 1 for skew-symmetric Q (the singular values of I + Q are
    sqrt(1 + σ²) ≥ 1), so every element of D is at most ‖F‖₂ plus that float64 term's norm.
    """
    weight = module.weight.detach().double()
    if module.coft:  # as get_weight does first
        weight = module._project_batch(weight, eps=module.eps)
    block_size = module.block_size
    skew = module._pytorch_skew_symmetric(weight, block_size)
    rotation = module._cayley_batch(weight, block_size, neumann, terms)
    identity = torch.eye(block_size, dtype=torch.float64)
    if neumann:
        absolute, power, series = skew.abs(), identity.expand_as(skew), identity.expand_as(skew)
        for k in range(1, terms):
            power = power @ absolute
            series = series + (2.0 if k < terms - 1 else 1.0) * power
        factor = terms * block_size + terms + terms * (block_size**2 + 4)
        bound = factor * UNIT_ROUNDOFF_64 * series
    else:
        residual = rotation @ (identity + skew) - (identity - skew)
        rounding = (
            (block_size + 2)
            * UNIT_ROUNDOFF_64
            * (rotation.abs() @ (identity + skew).abs() + (identity - skew).abs())
        )
        norm = torch.linalg.matrix_norm(residual, ord=2) + torch.linalg.matrix_norm(rounding)
        bound = norm.view(-1, 1, 1).expand_as(skew)
    blocks = module.in_features // block_size
    return torch.block_diag(*bound.expand(blocks, -1, -1)), torch.block_diag(
        *rotation.expand(blocks, -1, -1)
    )


def _check_oft_rotations(
    ours: dict[str, torch.Tensor],
    peft64: PeftModel,
    original: dict[str, torch.Tensor],
    native: dict[str, torch.Tensor],
    neumann: bool,
    dtype: torch.dtype,
) -> int:
    """Every rotated weight (a convolution's viewed (out, in·k·k), as PEFT's merge views it)
    within half an ulp of PEFT's float64 merge plus twice the derived bound, and no further
    from it than PEFT's own merge in the base's dtype. Returns how many were checked."""
    rotated = 0
    for name, module in peft64.base_model.model.named_modules():
        if not hasattr(module, "oft_R"):
            continue
        rotated += 1
        key = f"{name}.weight"
        weight = original[key].double().reshape(original[key].shape[0], -1)
        r_bound, rotation = _rotation_error_bound(module.oft_R["default"], neumann, 5)
        reference = weight @ rotation.T
        block = module.oft_R["default"].block_size
        bound = block * UNIT_ROUNDOFF_64 * (weight.abs() @ rotation.abs().T)
        bound = bound + weight.abs() @ r_bound.T
        error = (ours[key].double().reshape(reference.shape) - reference).abs()
        assert (error <= 0.5 * ulp(reference, dtype) + 2 * bound).all(), key
        theirs = native[key].double().reshape(reference.shape)
        assert (error <= (theirs - reference).abs() + 2 * bound).all(), key
    return rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(OFT_CASES))
def test_oft_is_the_float64_rotation_rounded_once(llama_adapters, tmp_path, case, dtype):
    """OFT: every rotated weight is within half an ulp of PEFT's float64 merge, plus twice the
    derived float64 bound (the products' b·u and R's own error, _rotation_error_bound), and
    never further from it than PEFT's own merge in the base's dtype; the merged model's
    logits are the unmerged PEFT model's."""
    bases, _ = llama_adapters
    make_config, neumann = OFT_CASES[case]
    base = bases[dtype]
    model = AutoModelForCausalLM.from_pretrained(bases[torch.float32], dtype=torch.float32)
    adapter = _save_oft(model, make_config(), tmp_path / case, stable_seed("oft", case))
    ours = _ours(base, adapter, tmp_path / "merged")
    native = _peft_model(base, adapter, dtype).merge_and_unload().state_dict()
    peft64 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).double()
    original = read_safetensors_directory(base)
    rotated = _check_oft_rotations(ours, peft64, original, native, neumann, dtype)
    assert rotated == 2 * len(LINEAR_TARGETS)
    for name, tensor in ours.items():  # everything else untouched
        if not any(f"{target}.weight" in name for target in LINEAR_TARGETS):
            assert torch.equal(tensor, original[name]), name
    if dtype == torch.float32:
        peft_model = _peft_model(base, adapter, torch.float32)
        unmerged = prompt_logits(peft_model)
        reference_logits = prompt_logits(float64_copy(peft_model), torch.float64)
        merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
        tolerance = unmerged_tolerance(unmerged, reference_logits, torch.float32)
        merged_logits = prompt_logits(merged_model)
        assert float((merged_logits.double() - unmerged.double()).abs().max()) <= tolerance


def test_oft_unmerge_undoes_the_merge(llama_adapters, tmp_path):
    """--unmerge of an OFT merge multiplies by inv(R) (PEFT's unmerge): the float32 weights
    come back within what the two roundings allow.

    Merging rounds each element of M = W·Rᵀ by at most half an ulp of M; unmerging maps that
    error e through inv(R)ᵀ, at most ‖e_block‖₂·‖inv(R)‖₂ per element (a block of b elements:
    ‖e_block‖₂ ≤ sqrt(b)·max|e|), and rounds once more (half an ulp of the result). Float64
    arithmetic adds (its own bound, a posteriori): R's error (_rotation_error_bound) moved
    through inv(R) twice, and inv(R)'s residual ‖X·R - I‖₂·‖inv(R)‖₂, times |M|'s row norm.
    """
    bases, _ = llama_adapters
    base = bases[torch.float32]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    make_config, _ = OFT_CASES["neumann"]
    adapter = _save_oft(model, make_config(), tmp_path / "oft", stable_seed("oft", "unmerge"))
    merged = _ours(base, adapter, tmp_path / "merged")
    restored = _ours(tmp_path / "merged", adapter, tmp_path / "restored", unmerge=True)
    original = read_safetensors_directory(base)
    peft64 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).double()
    checked = 0
    for name, module in peft64.base_model.model.named_modules():
        if not hasattr(module, "oft_R"):
            continue
        key, rotation_module = f"{name}.weight", module.oft_R["default"]
        block = rotation_module.block_size
        r_bound, rotation = _rotation_error_bound(rotation_module, True, 5)
        inverse = torch.linalg.inv(rotation)
        inverse_norm = float(torch.linalg.matrix_norm(inverse, ord=2))
        residual = float(torch.linalg.matrix_norm(inverse @ rotation - torch.eye(len(rotation)), 2))
        m = merged[key].double()
        blocks = m.abs().reshape(m.shape[0], -1, block).amax(dim=2)  # max |M| per row block
        spread = (0.5 * ulp(blocks, torch.float32) * block**0.5 * inverse_norm).repeat_interleave(
            block, dim=1
        )
        row_norm = torch.linalg.vector_norm(m, dim=1, keepdim=True)
        float64 = row_norm * (
            2 * inverse_norm**2 * float(r_bound.max()) * block + 2 * residual * inverse_norm
        )
        error = (restored[key].double() - original[key].double()).abs()
        assert (error <= 0.5 * ulp(restored[key], torch.float32) + spread + float64).all(), key
        assert not torch.equal(merged[key], original[key])
        checked += 1
    assert checked == 2 * len(LINEAR_TARGETS)


@pytest.mark.parametrize("tuner", LLAMA_TUNERS)
def test_verify_passes_on_every_type(llama_adapters, tmp_path, tuner):
    """--verify recomputes sampled rows of every adapted weight in float64: a correct merge
    passes, on a bf16 base (float32 arithmetic) and with --unmerge."""
    bases, adapters = llama_adapters
    base = bases[torch.bfloat16]
    _ours(base, adapters[tuner], tmp_path / "merged", verify=True)
    _ours(tmp_path / "merged", adapters[tuner], tmp_path / "back", verify=True, unmerge=True)


def test_verify_catches_a_wrong_tuner_row(llama_adapters, tmp_path, monkeypatch):
    """A LoHa merge off by 3% (a few bf16 ulps) in one row is caught: exit 8, OUT never appears."""
    from lora_merge.errors import VerificationError
    from lora_merge.stream import tiles

    original = tiles.tuner_row_merger

    def off_by_a_little(*args, **kwargs):
        merge_rows = original(*args, **kwargs)

        def rows(base_rows, start):
            merged = merge_rows(base_rows, start)
            if start == 0:
                merged[0] *= 1.03
            return merged

        return rows

    monkeypatch.setattr(tiles, "tuner_row_merger", off_by_a_little)
    bases, adapters = llama_adapters
    with pytest.raises(VerificationError):
        _ours(bases[torch.bfloat16], adapters["loha"], tmp_path / "merged", verify=True)
    assert not (tmp_path / "merged").exists()


@pytest.mark.bitsandbytes
@pytest.mark.parametrize("tuner", ["ia3", "loha"])
def test_bitsandbytes_nf4_base(llama_adapters, tmp_path, tuner):
    """Into a bitsandbytes NF4 base (double quant, blocksize 64, bf16 compute dtype): every
    adapted weight is PEFT's float64 merge into the dequantized weights (decoded from the
    file by quantized_oracle, independently of lora-merge's reader), rounded once to bf16,
    within half an ulp plus the float32 bound (one more u for the dequantization's
    product); the other tensors are the base's."""
    from bnb_checkpoints import save_bitsandbytes_4bit_checkpoint
    from quantized_oracle import decode_4bit

    bases, adapters = llama_adapters
    quantized = save_bitsandbytes_4bit_checkpoint(
        bases[torch.bfloat16], tmp_path / "nf4", double_quant=True
    )
    ours = _ours(quantized, adapters[tuner], tmp_path / "merged")
    stored = read_safetensors_directory(quantized)
    original = read_safetensors_directory(bases[torch.bfloat16])

    def dequantized_float64_base() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(bases[torch.bfloat16], dtype=torch.float64)
        state = {
            name: decode_4bit(stored, name).double() if f"{name}.absmax" in stored else value
            for name, value in model.state_dict().items()
        }
        model.load_state_dict(state)
        return model

    exact = _float64_reference(dequantized_float64_base(), adapters[tuner])
    magnitudes = (
        {} if tuner == "ia3" else _delta_magnitudes(dequantized_float64_base(), adapters[tuner])
    )
    unit_errors = 3 if tuner == "ia3" else 2 * LARGEST_RANK[tuner] + 4
    adapted = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        if f"{name}.absmax" not in stored or not any(t in name for t in LINEAR_TARGETS):
            assert torch.equal(tensor, original[name].to(torch.bfloat16)) or (
                f"{name}.absmax" in stored
            ), name
            continue
        adapted += 1
        reference = exact[name]
        terms = reference.abs() + magnitudes.get(name, 0.0)
        bound = unit_errors * 2.0**-24 * terms
        error = (tensor.double() - reference).abs()
        assert (error <= 0.5 * ulp(reference, torch.bfloat16) + bound).all(), name
    assert adapted == 2 * len(LINEAR_TARGETS)


def test_oft_on_convolutions(conv_adapters, tmp_path):
    """OFT on a 1x1 Conv2d: checked as the Linear layers are, and the merged model computes
    what the unmerged PEFT model does. On a 3x3 Conv2d PEFT's forward rotates unfolded,
    overlapping input patches, which no merged weight reproduces (PEFT's own merge moves the
    outputs): refused, exit 4, OUT not written."""
    base, _ = conv_adapters
    config = OFTConfig(r=0, oft_block_size=4, target_modules=["conv2d"])
    adapter = _save_oft(_conv_model(), config, tmp_path / "oft3", stable_seed("oft", "conv3"))
    with pytest.raises(InvalidInputError, match="no rotated weight reproduces"):
        _ours(base, adapter, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    config = OFTConfig(r=0, oft_block_size=4, target_modules=["pointwise"])
    adapter = _save_oft(_conv_model(), config, tmp_path / "oft", stable_seed("oft", "conv"))
    ours = _ours(base, adapter, tmp_path / "merged")
    native = PeftModel.from_pretrained(_conv_model(), adapter).eval().merge_and_unload()
    peft64 = PeftModel.from_pretrained(_conv_model(), adapter).double()
    original = read_safetensors_directory(base)
    rotated = _check_oft_rotations(ours, peft64, original, native.state_dict(), True, torch.float32)
    assert rotated == 1
    peft_model = PeftModel.from_pretrained(_conv_model(), adapter).eval()
    merged_model = _conv_model()
    merged_model.load_state_dict(ours)
    with torch.no_grad():
        unmerged, merged = peft_model(CONV_INPUTS), merged_model(CONV_INPUTS)
        reference = float64_copy(peft_model)({k: v.double() for k, v in CONV_INPUTS.items()})
    tolerance = unmerged_tolerance(unmerged, reference, torch.float32)
    assert float((merged.double() - unmerged.double()).abs().max()) <= tolerance
