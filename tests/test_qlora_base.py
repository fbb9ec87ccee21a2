"""``--qlora-base`` (issue 22, section 3): merge a QLoRA adapter into ``dequant(quant(W))``.

The oracles: bitsandbytes' own ``quantize_4bit`` then ``dequantize_4bit`` of each Linear
weight (checked here to be what transformers' 4-bit loading computes with), merged by PEFT's
``merge_and_unload``; and the unmerged QLoRA model itself (transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` on the CPU, the adapter active in PEFT), whose
logits the merged model must match within that model's own noise. The same comparison for a
plain merge into W is printed: that is the measurement docs/qlora-base.md reports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_oracle import read_safetensors_directory
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_checkpoints import prompt_logits
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from lora_merge import MergeOptions, merge
from lora_merge.errors import InvalidInputError, UsageError

pytestmark = pytest.mark.bitsandbytes

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (quant_type, double_quant): transformers' 4-bit loading always uses blocksize 64.
FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
FORMAT_IDS = [f"{q}{'-double' if d else ''}" for q, d in FORMATS]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny bf16 Llama (intermediate 384: 2 nested blocks of 256 absmax at blocksize 64)
    and a LoRA on every Linear."""
    root = tmp_path_factory.mktemp("qlora-base")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            value = 1.0 + 0.1 * noise if "norm" in name else 0.02 * noise
            parameter.copy_(value.to(parameter.dtype))
    model.save_pretrained(root / "base")
    torch.manual_seed(23)  # init_lora_weights=False draws A and B (B != 0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR_MODULES, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _bitsandbytes_round_trip(weight: torch.Tensor, quant_type: str, double: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double, quant_type=quant_type
    )
    return bnb_functional.dequantize_4bit(packed, quant_state=state)


def _peft_merge_into_round_trip(
    base: Path, adapter: Path, quant_type: str, double: bool
) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload into bitsandbytes' round trip of every Linear weight."""
    as_trained = {
        name: _bitsandbytes_round_trip(tensor, quant_type, double)
        if _is_linear_weight(name, tensor)
        else tensor
        for name, tensor in read_safetensors_directory(base).items()
    }
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.load_state_dict(as_trained)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith("_proj.weight") and tensor.dim() == 2


def _qlora_model(
    base: Path, quant_type: str, double: bool, compute_dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, device_map="cpu"
    )


@pytest.mark.parametrize(("quant_type", "double"), FORMATS, ids=FORMAT_IDS)
def test_qlora_base_is_peft_merge_into_bitsandbytes_round_trip(
    inputs: tuple[Path, Path], tmp_path: Path, quant_type: str, double: bool
) -> None:
    """Every tensor bit for bit: the Linear weights as PEFT merges the adapter into
    bitsandbytes' dequantize_4bit(quantize_4bit(W)), everything else as BASE has it."""
    base, adapter = inputs
    out = tmp_path / "out"
    merge(
        MergeOptions(
            base=base,
            adapter=adapter,
            out=out,
            qlora_base=True,
            quant_type=quant_type,
            double_quant=double,
            quiet=True,
        )
    )
    ours = read_safetensors_directory(out)
    assert set(ours) == set(read_safetensors_directory(base))
    for name, tensor in _peft_merge_into_round_trip(base, adapter, quant_type, double).items():
        assert torch.equal(ours[name], tensor), name
    card = (out / "README.md").read_text()
    assert f"--qlora-base: W is dequant(quant(W)) of BASE's Linear weights in {quant_type}" in card


@pytest.mark.parametrize(("quant_type", "double"), FORMATS, ids=FORMAT_IDS)
def test_round_trip_is_what_transformers_4bit_loading_computes_with(
    inputs: tuple[Path, Path], quant_type: str, double: bool
) -> None:
    """The oracle above is QLoRA's weight: each Linear4bit of transformers' 4-bit loading
    dequantizes to bitsandbytes' round trip of the 16-bit weight, bit for bit."""
    import bitsandbytes.functional as bnb_functional

    base, _ = inputs
    original = read_safetensors_directory(base)
    model = _qlora_model(base, quant_type, double)
    checked = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "quant_state", None) is None:
            continue
        seen = bnb_functional.dequantize_4bit(weight.data, quant_state=weight.quant_state)
        expected = _bitsandbytes_round_trip(original[f"{name}.weight"], quant_type, double)
        assert torch.equal(seen, expected), name
        checked += 1
    assert checked == 2 * len(LINEAR_MODULES)


@pytest.mark.parametrize(("quant_type", "double"), FORMATS, ids=FORMAT_IDS)
def test_qlora_base_matches_the_unmerged_qlora_model(
    inputs: tuple[Path, Path], tmp_path: Path, quant_type: str, double: bool
) -> None:
    """Logits of the merged model against the QLoRA model it replaces (transformers' 4-bit
    model, bf16, adapter unmerged in PEFT): --qlora-base within that model's own noise (its
    distance from a float64 evaluation of the merged weights, x3, plus one bf16 eps of the
    logits' scale).

    Printed beside it, the measurement docs/qlora-base.md reports: the same distance for
    a plain merge into W, and both merged models evaluated in float64 against the unmerged
    QLoRA model in float64 (the round-tripped weights with the adapter unmerged), which
    leaves only what the weights differ by. The plain merge is not asserted: how far it lands
    is a property of the model and adapter, not of lora-merge."""
    base, adapter = inputs
    merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "plain", quiet=True))
    merge(
        MergeOptions(
            base=base,
            adapter=adapter,
            out=tmp_path / "qlora",
            qlora_base=True,
            quant_type=quant_type,
            double_quant=double,
            quiet=True,
        )
    )
    qlora = PeftModel.from_pretrained(_qlora_model(base, quant_type, double), adapter).eval()
    unmerged = prompt_logits(qlora).double()
    float64 = {
        name: prompt_logits(
            AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float64),
            torch.float64,
        )
        for name in ("qlora", "plain")
    }
    noise = float((unmerged - float64["qlora"]).abs().max())
    scale = float(float64["qlora"].abs().max())
    tolerance = 3 * noise + torch.finfo(torch.bfloat16).eps * scale
    errors = {}
    for name in ("qlora", "plain"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16)
        errors[name] = float((prompt_logits(merged).double() - unmerged).abs().max())

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.load_state_dict(
        {
            name: _bitsandbytes_round_trip(tensor, quant_type, double)
            if _is_linear_weight(name, tensor)
            else tensor
            for name, tensor in read_safetensors_directory(base).items()
        }
    )
    exact = prompt_logits(PeftModel.from_pretrained(model.double(), adapter).eval(), torch.float64)
    exact_errors = {n: float((logits - exact).abs().max()) for n, logits in float64.items()}
    print(
        f"{quant_type}{' double' if double else ''}, logit scale {scale:.3g}: max |logits - "
        f"unmerged QLoRA| --qlora-base {errors['qlora']:.3g}, plain {errors['plain']:.3g} "
        f"(bf16 on CPU; that model's own noise {noise:.3g}); in float64: --qlora-base "
        f"{exact_errors['qlora']:.3g}, plain {exact_errors['plain']:.3g}"
    )
    assert errors["qlora"] <= tolerance


def test_format_recorded_in_base_config_is_used(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """A 16-bit BASE whose config.json carries transformers' BitsAndBytesConfig (so that
    from_pretrained quantizes on load) records the format training used: --qlora-base takes
    it when the options are left at their defaults, and refuses options that contradict it."""
    base, adapter = inputs
    recorded = tmp_path / "base"
    shutil.copytree(base, recorded)
    config = json.loads((recorded / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ).to_dict()
    (recorded / "config.json").write_text(json.dumps(config))
    merge(MergeOptions(base=recorded, adapter=adapter, out=tmp_path / "out", qlora_base=True))
    ours = read_safetensors_directory(tmp_path / "out")
    for name, tensor in _peft_merge_into_round_trip(base, adapter, "nf4", True).items():
        assert torch.equal(ours[name], tensor), name
    with pytest.raises(InvalidInputError, match="records the 4-bit format nf4 with double quant"):
        merge(
            MergeOptions(
                base=recorded,
                adapter=adapter,
                out=tmp_path / "fp4",
                qlora_base=True,
                quant_type="fp4",
            )
        )


def test_qlora_base_options_are_checked(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    with pytest.raises(UsageError, match="applies only with --save-method merged_16bit"):
        merge(
            MergeOptions(
                base=base,
                adapter=adapter,
                out=tmp_path / "out",
                qlora_base=True,
                save_method="merged_4bit",
            )
        )
