"""Adapters written by tools other than PEFT's save_pretrained: other key spellings.

A PEFT adapter of the tiny Llama case is re-saved with its keys spelled as other tools
spell them (no ``base_model.model.`` prefix; the ``.default`` adapter name left in, as a raw
``PeftModel.state_dict()`` has it). The merge must be exactly PEFT's merge_and_unload() of the
original adapter (bit-identical: bf16 Linear), and within half an ulp of float64 up to the
float32 evaluation error.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from hypothesis import given
from hypothesis import strategies as st
from merge_cases import MERGE_CASES
from merge_oracle import (
    FLOAT32_UNIT_ROUNDOFF,
    expected_merged_checkpoint,
    expected_misroundings,
    misrounding_limit,
    read_safetensors_directory,
    ulp,
)
from safetensors.torch import save_file

from lora_merge import MergeOptions, merge
from lora_merge.adapter.keys import adapter_key_name, split_adapter_name
from lora_merge.errors import AdapterMismatchError, InvalidInputError

LLAMA_BF16 = MERGE_CASES[0]
assert LLAMA_BF16.id == "llama-bf16-alpha-over-r-sharded"


def _without_prefix(key: str) -> str:
    return key.removeprefix("base_model.model.")


def _with_adapter_name(key: str) -> str:
    return re.sub(r"\.(lora_A|lora_B)\.weight$", r".\1.default.weight", key)


def _respelled_adapter(adapter: Path, folder: Path, rename) -> Path:
    folder.mkdir(parents=True)
    tensors = read_safetensors_directory(adapter)
    save_file(
        {rename(key): tensor for key, tensor in tensors.items()},
        folder / "adapter_model.safetensors",
    )
    shutil.copy(adapter / "adapter_config.json", folder / "adapter_config.json")
    return folder


@pytest.mark.parametrize(
    "rename", [_without_prefix, _with_adapter_name], ids=["no-prefix", "default-name"]
)
def test_respelled_keys_merge_exactly_like_peft(rename, tmp_path, case_inputs, peft_reference):
    inputs = case_inputs(LLAMA_BF16)
    adapter = _respelled_adapter(inputs.adapter, tmp_path / "adapter", rename)
    assert all(rename(k) != k for k in read_safetensors_directory(inputs.adapter))
    out = tmp_path / "out"
    merge(MergeOptions(base=inputs.base, adapter=adapter, out=out, quiet=True))

    merged = read_safetensors_directory(out)
    reference = peft_reference(LLAMA_BF16).merged_state_dict
    expected = expected_merged_checkpoint(inputs.base, inputs.adapter)
    adapted = [name for name, e in expected.items() if e.lora is not None]
    assert len(adapted) == 14  # 7 projections x 2 layers
    beyond_half = 0
    expected_beyond_half = 0.0
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name]), name  # bit-identical to PEFT
        if expected[name].exact is not None:
            # bf16 output, evaluated in float32 and rounded once.
            error = (tensor.double() - expected[name].exact).abs()
            half_ulp = 0.5 * ulp(tensor, tensor.dtype)
            bound = expected[name].rounding_error_bound(FLOAT32_UNIT_ROUNDOFF)
            assert bool((error <= half_ulp + bound).all()), name
            beyond_half += int((error > half_ulp).sum())
            expected_beyond_half += expected_misroundings(bound, 2 * half_ulp)
    assert beyond_half <= misrounding_limit(expected_beyond_half)


def _handmade_inputs(root: Path, tensors: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    write_base(root / "base", shards=1)
    write_adapter(root / "adapter", tensors)
    return root / "base", root / "adapter"


def test_keys_of_several_adapters_are_refused(tmp_path):
    tensors = {
        _with_adapter_name(key).replace(
            ".default.", ".first." if "q_proj" in key else ".second."
        ): value
        for key, value in adapter_tensors().items()
    }
    base, adapter = _handmade_inputs(tmp_path, tensors)
    with pytest.raises(InvalidInputError, match=r"two adapters \('first' and 'second'\)"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", quiet=True))
    assert not (tmp_path / "out").exists()


def test_unmatched_keys_are_listed_with_the_closest_base_keys(tmp_path):
    tensors = {
        key.replace("self_attn", "attention"): value for key, value in adapter_tensors().items()
    }
    base, adapter = _handmade_inputs(tmp_path, tensors)
    with pytest.raises(AdapterMismatchError) as raised:
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", quiet=True))
    message = str(raised.value)
    # 4 modules (q, v in 2 layers) match nothing; the first and two more are named.
    assert "4 keys match nothing" in message
    assert message.count("attention.") >= 3
    assert "closest base tensors are ['model.layers.0.self_attn.q_proj.weight'" in message
    assert not (tmp_path / "out").exists()


def test_a_name_two_base_tensors_could_mean_is_refused(tmp_path):
    base, adapter = _handmade_inputs(
        tmp_path,
        {
            key.removeprefix("base_model.model.model."): value
            for key, value in adapter_tensors().items()
        },
    )
    # A second copy of the layers under another top-level name: "layers.0..." is now ambiguous.
    tensors = read_safetensors_directory(base)
    tensors.update(
        {
            "decoder." + k.removeprefix("model."): v.clone()
            for k, v in tensors.items()
            if ".layers." in k
        }
    )
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterMismatchError, match="could be any of the base tensors"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", quiet=True))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # the adapter folder itself is untouched


module_names = st.lists(
    st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=5
).map(".".join)
adapter_names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True).filter(
    # "weight"/"bias" end a key; PEFT's own submodule names are no adapter's
    lambda name: name not in ("weight", "bias", "base_layer", "original_module", "token_adapter")
)


@given(module=module_names, adapter_name=adapter_names, data=st.data())
def test_adapter_names_are_found_and_removed(module, adapter_name, data):
    infix, tail = data.draw(
        st.sampled_from(
            [
                ("lora_A", ".weight"),
                ("lora_B", ".weight"),
                ("lora_B", ".bias"),
                ("lora_magnitude_vector", ".weight"),
                ("modules_to_save", ".weight"),
                ("lora_embedding_A", ""),
                ("lora_embedding_B", ""),
            ]
        )
    )
    saved = f"{module}.{infix}{tail}"  # as get_peft_model_state_dict writes it
    in_memory = f"{module}.{infix}.{adapter_name}{tail}"  # as PeftModel.state_dict() has it
    assert split_adapter_name(in_memory) == (saved, adapter_name)
    assert split_adapter_name(saved) == (saved, None)
    assert adapter_key_name(f"base_model.model.{in_memory}") == saved
