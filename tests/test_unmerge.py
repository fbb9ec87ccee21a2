"""``--unmerge``: subtracting the adapter turns a merged model back into its base.

Why merge-then-unmerge returns the base within one ulp (the float64 reasoning the test
checks): let d be the delta ``s * B @ A`` as lora-merge computes it (float32 for 16-bit
outputs, float64 for float32 outputs; the same bits both times). The merge stores
``m = round(W + d) = W + d + e1`` with ``|e1| <= ulp(W + d) / 2``. The unmerge computes
``m - d = W + e1`` in the wider type (its own error is ~2^-24 relative, far below an
output ulp) and rounds once. W is on the output grid, so the result is W exactly whenever
``|e1| < ulp(W) / 2``, which holds wherever W + d stays in W's binade or below; in every
case ``|result - W| <= ulp(W + d) / 2 + ulp(W) / 2 <= ulp(max(|W|, |m|))``. Where |d| is
much larger than |W| the merge rounded W's low bits away (at the merged value's ulp), and
no unmerge can recover them: the bound is one ulp of the larger of W and m.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from merge_cases import MERGE_CASES
from merge_oracle import read_adapter, read_safetensors_directory, resolve_lora_factors, ulp
from merge_process import LORA_MERGE
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.errors import EXIT_INVALID_INPUT, InvalidInputError, UsageError

CASES = {case.id: case for case in MERGE_CASES}
ROUND_TRIP_CASES = ["llama-bf16-alpha-over-r-sharded", "llama-fp32-alpha-over-r-single-file"]


@pytest.mark.parametrize("case_id", ROUND_TRIP_CASES)
# BASE is the merged model, not the base adapter_config.json names: no warning about that.
@pytest.mark.filterwarnings("error::lora_merge.errors.LoraMergeWarning")
def test_merge_then_unmerge_returns_the_base_within_one_ulp(case_id, tmp_path, case_inputs):
    case = CASES[case_id]
    inputs = case_inputs(case)
    merged_dir, unmerged_dir = tmp_path / "merged", tmp_path / "unmerged"
    merge(MergeOptions(base=inputs.base, adapter=inputs.adapter, out=merged_dir, quiet=True))
    merge(
        MergeOptions(
            base=merged_dir, adapter=inputs.adapter, out=unmerged_dir, quiet=True, unmerge=True
        )
    )
    card = (unmerged_dir / "README.md").read_text()
    assert "--unmerge: W - scale * B @ A" in card
    base = read_safetensors_directory(inputs.base)
    merged = read_safetensors_directory(merged_dir)
    unmerged = read_safetensors_directory(unmerged_dir)
    config, adapter = read_adapter(inputs.adapter)
    factors = resolve_lora_factors(config, adapter)
    assert set(unmerged) == set(base)

    exact_elements = total_elements = kept_binade = tipped = 0
    for module, lora in factors.items():
        name = f"{module}.weight"
        original, once, back = base[name], merged[name], unmerged[name]
        assert back.dtype == original.dtype
        delta, magnitude = lora.delta_and_magnitude()
        # 1. The unmerge itself rounds once: within half an ulp of float64 (m - s * B @ A), up
        #    to the float32 arithmetic bound where the terms nearly cancel.
        exact_unmerge = once.double() - lora.scale * delta
        unit = torch.finfo(torch.float32 if back.itemsize == 2 else torch.float64).eps / 2
        bound = (lora.rank + 2) * unit * (once.double().abs() + lora.scale * magnitude)
        error = (back.double() - exact_unmerge).abs()
        assert bool((error <= 0.5 * ulp(exact_unmerge, back.dtype) + bound).all()), name
        # 2. The round trip: within one ulp of the larger of W and m (see the module docstring).
        distance = (back.double() - original.double()).abs()
        larger = torch.maximum(original.double().abs(), once.double().abs())
        assert bool((distance <= ulp(larger, back.dtype)).all()), name
        # 3. Where the merge did not grow W into a higher binade (ulp(m) <= ulp(W)), W comes
        #    back bit for bit, but for near-ties of the merge's rounding that the wider-type
        #    arithmetic (its error grows with |d| when W + d cancels) tips over by one ulp.
        same_spacing = ulp(once, back.dtype) <= ulp(original, back.dtype)
        kept_binade += int(same_spacing.sum())
        tipped += int((back[same_spacing] != original[same_spacing]).sum())
        exact_elements += int((back == original).sum())
        total_elements += original.numel()
        assert not torch.equal(once, original)  # the merge did change the weight
    # These random adapters have |d| larger than |W| for most elements (init_lora_weights=False),
    # so most sums change binade. Measured: bf16 29006 of 73728 elements bit-exact, 16266 kept
    # their binade, of which 20 tipped by one ulp; float32 (float64 arithmetic) 28747 bit-exact,
    # 15995 kept their binade, none tipped. Every element is within one ulp of max(|W|, |m|).
    assert tipped <= 0.005 * kept_binade
    assert exact_elements > total_elements / 5
    for name, tensor in base.items():  # tensors the adapter does not touch are unchanged
        if name.removesuffix(".weight") not in factors:
            assert torch.equal(unmerged[name], tensor), name


def test_unmerge_negates_the_scale_of_a_lora_bias(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tensors = write_base(base, shards=1)
    lora = adapter_tensors()
    lora_bias = torch.randn(32, generator=torch.Generator().manual_seed(3))
    lora["base_model.model.model.layers.0.self_attn.v_proj.lora_B.bias"] = lora_bias
    # The handmade base has no v_proj bias: add one so that lora_bias has somewhere to go.
    tensors["model.layers.0.self_attn.v_proj.bias"] = torch.linspace(-1, 1, 32).to(torch.bfloat16)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    write_adapter(adapter, lora, lora_bias=True)
    merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", quiet=True, unmerge=True))
    written = read_safetensors_directory(tmp_path / "out")["model.layers.0.self_attn.v_proj.bias"]
    exact = tensors["model.layers.0.self_attn.v_proj.bias"].double() - 2.0 * lora_bias.double()
    assert bool(((written.double() - exact).abs() <= 0.5 * ulp(exact, torch.bfloat16)).all())


def _peft_dora_adapter(base, folder):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def test_unmerging_a_dora_adapter_is_refused(tmp_path, case_inputs):
    inputs = case_inputs(CASES["llama-bf16-alpha-over-r-sharded"])
    adapter = _peft_dora_adapter(inputs.base, tmp_path / "dora")
    result = subprocess.run(
        [LORA_MERGE, str(inputs.base), str(adapter), str(tmp_path / "out"), "--unmerge"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == EXIT_INVALID_INPUT
    assert "--unmerge cannot undo a DoRA adapter" in result.stderr
    assert "use_dora=true" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_magnitude_vectors_alone_mark_an_adapter_as_dora(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_base(base, shards=1)
    lora = adapter_tensors()
    lora["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    write_adapter(adapter, lora)  # config without use_dora, as another tool may write it
    with pytest.raises(InvalidInputError, match="lora_magnitude_vector"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", unmerge=True))


def test_unmerging_an_adapter_that_replaces_tensors_is_refused(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tensors = write_base(base, shards=1)
    lora = adapter_tensors()
    lora["base_model.model.lm_head.weight"] = tensors["lm_head.weight"].float() + 1
    write_adapter(adapter, lora)
    with pytest.raises(InvalidInputError, match=r"cannot restore 'lm_head\.weight'"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", unmerge=True))
    assert not (tmp_path / "out").exists()


def test_unmerge_takes_one_adapter(tmp_path):
    base, first, second = tmp_path / "base", tmp_path / "first", tmp_path / "second"
    write_base(base, shards=1)
    write_adapter(first)
    write_adapter(second)
    with pytest.raises(UsageError, match="--unmerge and loralib checkpoints"):
        merge(MergeOptions(base=base, adapter=[first, second], out=tmp_path / "out", unmerge=True))
    assert not (tmp_path / "out").exists()


def test_unmerge_cannot_write_an_adapter(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_base(base, shards=1)
    write_adapter(adapter)
    with pytest.raises(UsageError, match="cannot be used with --unmerge"):
        merge(
            MergeOptions(
                base=base, adapter=adapter, out=tmp_path / "out", unmerge=True, save_method="lora"
            )
        )
    assert not (tmp_path / "out").exists()


def test_unmerging_trainable_tokens_is_refused(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_base(base, shards=1)
    lora = adapter_tensors()
    lora["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.ones(
        2, 64
    )
    write_adapter(adapter, lora, trainable_token_indices=[3, 5])
    with pytest.raises(InvalidInputError, match="trainable tokens"):
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", unmerge=True))
    assert not (tmp_path / "out").exists()
