"""Adapter variants beyond plain Linear LoRA that need more than the case table of
test_merge_vs_peft.py: convolutions (a hand-written torch model, since no tiny transformers
causal LM has them) and the correctly rounded float64 -> 16-bit conversion column DoRA uses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import adapter_tensors as handmade_adapter_tensors
from handmade_checkpoints import write_adapter, write_base
from merge_cases import MERGE_CASES
from merge_oracle import (
    expected_merged_checkpoint,
    read_adapter,
    read_safetensors_directory,
    ulp,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tiny_checkpoints import (
    float64_copy,
    ignoring_expected_peft_warnings,
    load_peft_model,
    prompt_logits,
    save_tiny_lora_adapter,
    stable_seed,
    unmerged_tolerance,
)
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.api import preview_merge
from lora_merge.compute.lora import round_float64_to
from lora_merge.errors import (
    AdapterMismatchError,
    InvalidInputError,
    LoraMergeWarning,
    NonFiniteError,
    VerificationError,
)
from lora_merge.stream import tiles


def test_float64_to_16_bit_rounds_once_even_next_to_a_midpoint():
    """Values a hair above or below the midpoint of two adjacent 16-bit numbers go to the nearer
    one; plain ``.to(bfloat16)`` goes through float32 and sends many of them the wrong way."""
    for dtype in (torch.bfloat16, torch.float16):
        generator = torch.Generator().manual_seed(7)
        draws = torch.randn(20_000, generator=generator, dtype=torch.float64)
        lower = draws.abs().clamp_min(1e-3).to(dtype).double()
        spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(lower)))
        upper = lower + spacing  # the next 16-bit number above `lower` (exact in float64)
        sign = torch.where(draws < 0, -1.0, 1.0).double()
        midpoint = (lower + upper) / 2
        offset = midpoint * 2.0**-40
        above, below = sign * (midpoint + offset), sign * (midpoint - offset)
        assert torch.equal(round_float64_to(above, dtype).double(), sign * upper)
        assert torch.equal(round_float64_to(below, dtype).double(), sign * lower)
        assert torch.equal(round_float64_to(sign * lower, dtype).double(), sign * lower)
        assert not torch.equal(above.to(dtype).double(), sign * upper)  # what this avoids


class TinyConvolutions(torch.nn.Module):
    """One of each convolution PEFT's LoRA wraps, including the Conv3d kernel (1, 1, k) that
    PEFT's own merge mistakes for a 1x1 kernel, and a grouped Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = torch.nn.Conv1d(4, 8, 3)
        self.conv2d = torch.nn.Conv2d(4, 8, 3)
        self.pointwise = torch.nn.Conv2d(8, 6, 1)
        self.conv3d = torch.nn.Conv3d(4, 8, (1, 1, 3))
        self.cube = torch.nn.Conv3d(4, 5, 2)
        self.grouped = torch.nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = [
            self.conv1d(inputs["1d"]),
            self.pointwise(self.conv2d(inputs["2d"])),
            self.conv3d(inputs["3d"]),
            self.cube(inputs["3d"]),
        ]
        return torch.cat([output.flatten() for output in outputs])


CONV_TARGETS = ["conv1d", "conv2d", "pointwise", "conv3d", "cube"]
CONV_INPUTS = {
    "1d": torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1)),
    "2d": torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(2)),
    "3d": torch.randn(2, 4, 3, 3, 5, generator=torch.Generator().manual_seed(3)),
}


def _conv_model() -> TinyConvolutions:
    torch.manual_seed(0)
    return TinyConvolutions()


@pytest.fixture(scope="module")
def conv_inputs(tmp_path_factory):
    """A float32 TinyConvolutions base, and LoRA and DoRA adapters saved by PEFT."""
    root = tmp_path_factory.mktemp("conv")
    base = root / "base"
    base.mkdir()
    save_file(_conv_model().state_dict(), base / "model.safetensors", metadata={"format": "pt"})
    adapters = {}
    for name, extra in (("lora", {"lora_bias": True}), ("dora", {"use_dora": True})):
        torch.manual_seed(stable_seed("conv", name))
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=CONV_TARGETS, init_lora_weights=False, **extra
        )
        peft_model = get_peft_model(_conv_model(), config)
        with torch.no_grad():  # move DoRA's m away from its initial norms, as training does
            for parameter_name, parameter in peft_model.named_parameters():
                if "lora_magnitude_vector" in parameter_name:
                    parameter.mul_(1.0 + 0.2 * torch.randn(parameter.shape))
        with ignoring_expected_peft_warnings():  # lora_bias's 1-D lora_B.bias
            peft_model.save_pretrained(root / name)
        adapters[name] = root / name
    return base, adapters


def _merge_with_lora_merge(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True))
    return read_safetensors_directory(out)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_convolutions_merge_within_half_an_ulp_and_match_peft(conv_inputs, tmp_path, variant):
    """Conv1d/2d/3d LoRA with lora_bias (and DoRA, one norm per output channel): every merged
    float32 weight and bias is the float64 merge rounded once; where PEFT can merge (all but
    the (1, 1, k) Conv3d) no element is further from exact than PEFT's, and the merged model
    computes what the unmerged PEFT model computes."""
    base, adapters = conv_inputs
    preview = preview_merge(
        MergeOptions(base=base, adapter=adapters[variant], out=tmp_path / "out")
    )
    layer = "convolution" if variant == "lora" else "dora-convolution"
    assert preview.lora_modules_by_layer == {layer: len(CONV_TARGETS)}
    merged = _merge_with_lora_merge(base, adapters[variant], tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("m / norm(V) * V" in card) is (variant == "dora")
    expected = expected_merged_checkpoint(base, adapters[variant])
    assert sorted(merged) == sorted(expected)
    adapted = 0
    for name, expectation in expected.items():
        if expectation.lora is None:
            assert torch.equal(merged[name], expectation.source), name
            continue
        adapted += 1
        error = (merged[name].double() - expectation.exact).abs()
        half_ulp = 0.5 * ulp(merged[name], torch.float32)
        assert (error <= half_ulp + expectation.rounding_error_bound(2.0**-53)).all(), name
    # weights, and with lora_bias=True the convolutions' biases too
    assert adapted == len(CONV_TARGETS) * (2 if variant == "lora" else 1)

    peft_model = PeftModel.from_pretrained(_conv_model(), adapters[variant]).eval()
    with torch.no_grad():
        unmerged_output = peft_model(CONV_INPUTS)
    layers = dict(peft_model.base_model.model.named_children())
    with pytest.raises(RuntimeError):  # PEFT squeezes the (1, 1, 3) kernel as if it were 1x1
        layers["conv3d"].merge()
    for name in ("conv1d", "conv2d", "pointwise", "cube"):
        layers[name].merge()
        for kind in ("weight", "bias") if variant == "lora" else ("weight",):
            peft_tensor = getattr(layers[name].get_base_layer(), kind).detach().double()
            exact = expected[f"{name}.{kind}"].exact
            ours = merged[f"{name}.{kind}"].double()
            assert ((ours - exact).abs() <= (peft_tensor - exact).abs()).all(), (name, kind)

    model = _conv_model()
    model.load_state_dict(merged)
    with torch.no_grad():
        merged_output = model(CONV_INPUTS)
        float64_output = float64_copy(
            PeftModel.from_pretrained(_conv_model(), adapters[variant]).eval()
        )({key: value.double() for key, value in CONV_INPUTS.items()})
    tolerance = unmerged_tolerance(unmerged_output, float64_output, torch.float32)
    assert float((merged_output - unmerged_output).abs().max()) <= tolerance


def test_grouped_convolution_is_refused_by_name(conv_inputs, tmp_path):
    """PEFT trains LoRA on a grouped convolution but cannot merge it; neither do we, and the
    error says why (exit code 4), leaving no OUT."""
    base, _ = conv_inputs
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["grouped"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer with groups")
        get_peft_model(_conv_model(), config).save_pretrained(tmp_path / "grouped")
    with pytest.raises(InvalidInputError, match=r"grouped convolution \(groups = 2"):
        merge(MergeOptions(base=base, adapter=tmp_path / "grouped", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lora_bias_on_a_layer_without_bias_adds_one_that_transformers_loads(
    tiny_base_checkpoint, tmp_path
):
    """PEFT trains lora_bias=True on Llama's bias-free q_proj and down_proj but cannot merge
    it. lora-merge writes bias = scale * b (rounded once), zero biases for the other modules
    that Llama's attention_bias / mlp_bias flags switch on, sets both flags, and the merged
    model loads without missing keys and computes what the unmerged PEFT model computes."""
    base = tiny_base_checkpoint("llama", torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_bias=True,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights=False,
    )
    adapter = save_tiny_lora_adapter(
        base, torch.float32, config, tmp_path / "adapter", seed=11, safe_serialization=True
    )
    out = tmp_path / "out"
    merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, verify=True))

    merged = read_safetensors_directory(out)
    _, adapter_tensors = read_adapter(adapter)
    new_biases = sorted(set(merged) - set(read_safetensors_directory(base)))
    groups = {
        "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    }
    assert new_biases == sorted(
        f"model.layers.{layer}.{group}.{leaf}.bias"
        for layer in range(2)
        for group, leaves in groups.items()
        for leaf in leaves
    )
    for name in new_biases:
        trained = adapter_tensors.get(f"base_model.model.{name[:-5]}.lora_B.bias")
        expected = torch.zeros_like(merged[name]) if trained is None else 2.0 * trained
        assert torch.equal(merged[name], expected.float()), name  # 2 * b is exact
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["attention_bias"] is True and saved_config["mlp_bias"] is True

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {kind: list(keys) for kind, keys in info.items() if keys} == {}
    peft_model = load_peft_model(AutoModelForCausalLM.from_pretrained(base), adapter)
    unmerged = prompt_logits(peft_model)
    tolerance = unmerged_tolerance(
        unmerged, prompt_logits(float64_copy(peft_model), torch.float64), model.dtype
    )
    difference = float((prompt_logits(model.eval()) - unmerged).abs().max())
    assert difference <= tolerance


def test_lora_bias_the_architecture_cannot_hold_is_refused(tiny_base_checkpoint, tmp_path):
    """Qwen2's o_proj has no bias and no config flag to give it one: the error says so."""
    base = tiny_base_checkpoint("qwen2", torch.bfloat16)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_bias=True, target_modules=["o_proj"], init_lora_weights=False
    )
    adapter = save_tiny_lora_adapter(
        base, torch.bfloat16, config, tmp_path / "adapter", seed=12, safe_serialization=True
    )
    with pytest.raises(AdapterMismatchError, match=r"o_proj\.weight', which has none, and qwen2"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", quiet=True))
    assert not (tmp_path / "out").exists()


TIED_EMBEDDINGS = {"llama-tied": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}
TIED_CASES = {
    # case -> (family, adapter config, whether OUT must write lm_head and untie it)
    "lora-on-embedding": ("llama-tied", {"target_modules": ["embed_tokens", "q_proj"]}, True),
    "lora-on-lm-head": ("llama-tied", {"target_modules": ["lm_head", "v_proj"]}, True),
    "ensure-weight-tying": (
        "llama-tied",
        {"target_modules": ["embed_tokens"], "ensure_weight_tying": True},
        True,
    ),
    "modules-to-save-lm-head": (
        "llama-tied",
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
        True,
    ),
    "neither": ("llama-tied", {"target_modules": ["q_proj", "down_proj"]}, False),
    # PEFT replaces the same rows of the tied head: the tie holds.
    "trainable-tokens": (
        "llama-tied",
        {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 200]},
        False,
    ),
    # GPT-2 is tied out of the box (transformer.wte); its head is lm_head.
    "gpt2-lora-on-wte": (
        "gpt2",
        {"target_modules": ["wte", "c_attn"], "fan_in_fan_out": True},
        True,
    ),
    "gpt2-neither": ("gpt2", {"target_modules": ["c_fc"], "fan_in_fan_out": True}, False),
}


@pytest.mark.parametrize("case", list(TIED_CASES))
def test_tied_embeddings_are_untied_exactly_when_the_adapter_changes_one(
    case, tiny_base_checkpoint, tmp_path
):
    """Tiny Llama with tie_word_embeddings=True, and GPT-2 (no lm_head in either checkpoint).
    When the adapter changes the embedding or lm_head, OUT holds both with their own values
    (each the float64 merge of the same model with its head written out, rounded once) and says
    tie_word_embeddings=false; otherwise it stays tied and stores no lm_head. Either way
    --verify passes, the reloaded model has no missing weights and its logits are the unmerged
    PEFT model's."""
    family, extra, untied = TIED_CASES[case]
    embedding = TIED_EMBEDDINGS[family]
    base = tiny_base_checkpoint(family, torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra)
    adapter = save_tiny_lora_adapter(
        base,
        torch.float32,
        config,
        tmp_path / "adapter",
        seed=stable_seed(case),
        safe_serialization=True,
    )
    out = tmp_path / "out"
    merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, verify=True))

    merged = read_safetensors_directory(out)
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["tie_word_embeddings"] is (not untied)
    assert ("lm_head.weight" in merged) is untied
    # The oracle: the same merge into the base with its tied head written out.
    materialized = tmp_path / "materialized"
    materialized.mkdir()
    base_tensors = read_safetensors_directory(base)
    # Tied, they are one parameter: a saved base layer of either (PEFT saves the wrapped
    # embedding's) is loaded into both.
    _, adapter_tensors = read_adapter(adapter)
    saved_layers = (f"{embedding.rsplit('.', 1)[0]}.base_layer.weight", "lm_head.base_layer.weight")
    shared = [tensor for key, tensor in adapter_tensors.items() if key.endswith(saved_layers)]
    for name in ("lm_head.weight", embedding):
        base_tensors[name] = (shared or [base_tensors[embedding]])[0].clone()
    save_file(base_tensors, materialized / "model.safetensors")
    expected = expected_merged_checkpoint(materialized, adapter)
    for name, output in merged.items():
        expectation = expected[name]
        if expectation.lora is None:
            assert torch.equal(output, expectation.source), name
            continue
        error = (output.double() - expectation.exact).abs()
        bound = 0.5 * ulp(output, torch.float32) + expectation.rounding_error_bound(2.0**-53)
        assert (error <= bound).all(), name

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {kind: list(keys) for kind, keys in info.items() if keys} == {}
    peft_model = load_peft_model(AutoModelForCausalLM.from_pretrained(base), adapter)
    unmerged = prompt_logits(peft_model)
    tolerance = unmerged_tolerance(
        unmerged, prompt_logits(float64_copy(peft_model), torch.float64), model.dtype
    )
    difference = float((prompt_logits(model.eval()) - unmerged).abs().max())
    assert difference <= tolerance


def test_resized_tied_embedding_without_a_head_of_that_size_is_refused(
    tiny_base_checkpoint, tmp_path
):
    """A trained copy of a resized embed_tokens on a tied base says nothing about the head's new
    rows: refused (exit 5), rather than writing a head of the old size or guessing its rows."""
    base = tiny_base_checkpoint("llama-tied", torch.float32)
    embedding = read_safetensors_directory(base)["model.embed_tokens.weight"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    resized = torch.cat([embedding, torch.randn(16, embedding.shape[1])])
    save_file(
        {"base_model.model.model.embed_tokens.modules_to_save.weight": resized},
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "modules_to_save": ["embed_tokens"]}
        )
    )
    with pytest.raises(AdapterMismatchError, match=r"resizes the vocabulary to 272 rows .* tied"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", quiet=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_verify_recomputes_convolution_and_dora_rows(conv_inputs, tmp_path, variant):
    """--verify's float64 recomputation of sampled rows knows flattened convolution rows and
    DoRA's per-row norm: a correct merge passes, a corrupted DoRA magnitude is caught."""
    base, adapters = conv_inputs
    merge(
        MergeOptions(
            base=base, adapter=adapters[variant], out=tmp_path / "ok", quiet=True, verify=True
        )
    )
    if variant == "dora":
        original = tiles.dora_scale_rows

        def off_by_a_little(values, magnitude_rows):
            return original(values, magnitude_rows * 1.001)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tiles, "dora_scale_rows", off_by_a_little)
            with pytest.raises(VerificationError, match="row"):
                merge(
                    MergeOptions(
                        base=base, adapter=adapters[variant], out=tmp_path / "bad", verify=True
                    )
                )
        assert not (tmp_path / "bad").exists()


def test_resized_tied_embedding_with_lora_writes_both_at_the_new_size(
    tiny_base_checkpoint, tmp_path
):
    """Tied Llama resized to 272 tokens, LoRA on embed_tokens: PEFT saves the resized base layer,
    which is the tied head's parameter too. OUT has embed_tokens (merged) and lm_head (the
    resized rows, no LoRA) at 272 rows, vocab_size 272, untied, and the unmerged PEFT model's
    logits."""
    base = tiny_base_checkpoint("llama-tied", torch.float32)

    def resized_base_model():
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(3)
        model.resize_token_embeddings(272, mean_resizing=False)
        return model

    torch.manual_seed(4)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    with ignoring_expected_peft_warnings():
        get_peft_model(resized_base_model(), config).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    merge(MergeOptions(base=base, adapter=tmp_path / "adapter", out=out, quiet=True, verify=True))

    merged = read_safetensors_directory(out)
    assert merged["lm_head.weight"].shape == merged["model.embed_tokens.weight"].shape == (272, 64)
    saved_config = json.loads((out / "config.json").read_text())
    assert (saved_config["vocab_size"], saved_config["tie_word_embeddings"]) == (272, False)
    _, adapter_tensors = read_adapter(tmp_path / "adapter")
    resized_rows = adapter_tensors["base_model.model.model.embed_tokens.base_layer.weight"]
    assert torch.equal(merged["lm_head.weight"], resized_rows)
    assert not torch.equal(merged["model.embed_tokens.weight"], resized_rows)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = load_peft_model(resized_base_model(), tmp_path / "adapter")
    unmerged = prompt_logits(peft_model)
    tolerance = unmerged_tolerance(
        unmerged, prompt_logits(float64_copy(peft_model), torch.float64), model.dtype
    )
    difference = float((prompt_logits(model) - unmerged).abs().max())
    assert difference <= tolerance


def test_nan_in_a_dora_magnitude_is_refused_and_named(tmp_path):
    """NaN in m is refused like PEFT's safe_merge would, and the message names m's key."""
    write_base(tmp_path / "base")
    tensors = handmade_adapter_tensors()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key] = torch.ones(64)
    tensors[key][5] = float("nan")
    write_adapter(tmp_path / "adapter", tensors)
    with pytest.raises(NonFiniteError, match=key):
        merge(
            MergeOptions(base=tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "out")
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case_id",
    [
        "llama-bf16-dora-linear-and-embedding",
        "gpt2-bf16-dora-conv1d-fan-in-fan-out",
        "llama-bf16-trainable-tokens",
    ],
)
def test_dora_and_token_rows_in_many_small_tiles_write_the_same_bytes(
    case_id, case_inputs, lora_merge_output, tmp_path
):
    """With a 16 KB budget every DoRA weight spans many row tiles, so the embedding's and
    Conv1D's column norms are summed over tiles in two passes, and trainable-token rows fall
    in different tiles: the output is byte-identical to the run whose tiles hold whole
    tensors (which the PEFT comparison checked)."""
    case = next(case for case in MERGE_CASES if case.id == case_id)
    inputs = case_inputs(case)
    out = tmp_path / "small-tiles"
    merge(
        MergeOptions(
            base=inputs.base,
            adapter=inputs.adapter,
            out=out,
            max_shard_size=case.max_shard_size,
            max_memory="16KB",
            quiet=True,
        )
    )
    reference = read_safetensors_directory(lora_merge_output(case))
    small_tiles = read_safetensors_directory(out)
    assert sorted(small_tiles) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(small_tiles[name], tensor), name


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bf16_convolutions_are_bit_identical_to_peft(tmp_path, variant):
    """In bf16, PEFT's convolution merge (LoRA via conv_fn or a 1x1 product, DoRA with its
    per-channel norm) rounds once from float32, as lora-merge does: every element of the four
    convolutions PEFT can merge is the same."""

    def bf16_model() -> TinyConvolutions:
        return _conv_model().to(torch.bfloat16)

    (tmp_path / "base").mkdir()
    save_file(bf16_model().state_dict(), tmp_path / "base" / "model.safetensors")
    torch.manual_seed(stable_seed("bf16-conv", variant))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=CONV_TARGETS,
        init_lora_weights=False,
        use_dora=variant == "dora",
    )
    peft_model = get_peft_model(bf16_model(), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.2 * torch.randn(parameter.shape))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = _merge_with_lora_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")

    layers = dict(
        PeftModel.from_pretrained(
            bf16_model(), tmp_path / "adapter"
        ).base_model.model.named_children()
    )
    for name in ("conv1d", "conv2d", "pointwise", "cube"):
        layers[name].merge()
        assert torch.equal(merged[f"{name}.weight"], layers[name].get_base_layer().weight), name


def test_head_stored_beside_a_tied_embedding_is_untied_when_either_changes(
    tiny_base_checkpoint, tmp_path
):
    """Some tied checkpoints store lm_head anyway. With the embedding changed, transformers
    would still tie on load and replace the head with the merged embedding (PEFT #2018): OUT
    says tie_word_embeddings=false, holds the head's own value, and reloads to the unmerged
    PEFT model's logits."""
    tied = tiny_base_checkpoint("llama-tied", torch.float32)
    base = tmp_path / "base"
    base.mkdir()
    tensors = read_safetensors_directory(tied)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text((tied / "config.json").read_text())
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    adapter = save_tiny_lora_adapter(
        tied, torch.float32, config, tmp_path / "adapter", seed=21, safe_serialization=True
    )
    out = tmp_path / "out"
    with pytest.warns(LoraMergeWarning, match="the adapter was trained on"):  # another folder
        merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True))

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = read_safetensors_directory(out)
    # Tied on load, head and embedding are one parameter: PEFT's saved base layer of the
    # embedding is the head's value too.
    _, adapter_tensors = read_adapter(adapter)
    saved_layer = adapter_tensors["base_model.model.model.embed_tokens.base_layer.weight"]
    assert torch.equal(merged["lm_head.weight"], saved_layer)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = load_peft_model(AutoModelForCausalLM.from_pretrained(tied), adapter)
    unmerged = prompt_logits(peft_model)
    tolerance = unmerged_tolerance(
        unmerged, prompt_logits(float64_copy(peft_model), torch.float64), model.dtype
    )
    difference = float((prompt_logits(model) - unmerged).abs().max())
    assert difference <= tolerance
