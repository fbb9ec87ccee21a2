"""lora-merge against an independent float64 oracle and against PEFT's merge_and_unload().

Every case (see merge_cases.py) merges a seeded tiny checkpoint with a seeded LoRA adapter whose
B factors are non-zero, then checks the output tensor by tensor, as a loadable model, and as a
set of files.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from merge_cases import MERGE_CASE_IDS, MERGE_CASES, PeftAgreement
from merge_oracle import (
    FLOAT32_UNIT_ROUNDOFF,
    FLOAT64_UNIT_ROUNDOFF,
    expected_merged_checkpoint,
    expected_misroundings,
    misrounding_limit,
    read_adapter,
    read_safetensors_directory,
    resolve_lora_factors,
    ulp,
)
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from tiny_checkpoints import prompt_logits, unmerged_tolerance
from transformers import AutoModelForCausalLM

CASES_BY_ID = dict(zip(MERGE_CASE_IDS, MERGE_CASES, strict=True))
SHARDED_CASES = [case for case in MERGE_CASES if case.expect_sharded_output]
SINGLE_FILE_CASES = [case for case in MERGE_CASES if not case.expect_sharded_output]
ADAPTER_FILE_NAMES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}


def parametrize_cases(cases):
    return pytest.mark.parametrize("case", cases, ids=[case.id for case in cases])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kilobytes_to_bytes(size: str) -> int:
    """Parse "64KB" as 64000 bytes: as in transformers' max_shard_size, KB is decimal."""
    assert size.endswith("KB"), size
    return int(size.removesuffix("KB")) * 1000


def max_in_ulps(error: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> float:
    return float((error / ulp(values, dtype)).max())


def test_ulp_helper_matches_known_spacings():
    """ulp() gives each dtype's true spacing, also at zero, subnormals and powers of two."""
    assert ulp(torch.tensor([1.0]), torch.bfloat16).item() == 2.0**-7
    assert ulp(torch.tensor([1.0]), torch.float16).item() == 2.0**-10
    assert ulp(torch.tensor([-1.99]), torch.float32).item() == 2.0**-23
    assert ulp(torch.tensor([2.0]), torch.float32).item() == 2.0**-22
    assert ulp(torch.tensor([0.0]), torch.float16).item() == 2.0**-24
    assert ulp(torch.tensor([1e-40]), torch.float32).item() == 2.0**-149
    assert ulp(torch.tensor([0.0]), torch.bfloat16).item() == 2.0**-133
    samples = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).abs() + 1e-30
    spacing_above = torch.nextafter(samples, torch.tensor(float("inf"))) - samples
    assert torch.equal(ulp(samples, torch.float32), spacing_above.double())


@parametrize_cases(MERGE_CASES)
def test_oracle_resolves_the_same_lora_settings_as_peft(case, case_inputs, peft_reference):
    """The float64 oracle adapts the same modules with the same rank, scale and layout as PEFT
    does when it loads the adapter, so the oracle is a faithful stand-in for PEFT's semantics."""
    adapter_config, adapter_tensors = read_adapter(case_inputs(case).adapter)
    oracle = resolve_lora_factors(adapter_config, adapter_tensors)
    peft_settings = peft_reference(case).module_settings

    assert sorted(oracle) == sorted(peft_settings)
    for module_name, factors in oracle.items():
        peft = peft_settings[module_name]
        assert (factors.rank, factors.scale) == (peft.rank, peft.scale), module_name
        assert factors.fan_in_fan_out == peft.fan_in_fan_out or factors.is_embedding, module_name


def test_pattern_case_resolves_rank_and_alpha_as_documented(case_inputs):
    """The rank/alpha pattern case really exercises first-match-wins in stored (sorted) key
    order, regex keys, and a dotted-suffix key ("proj") that must match nothing."""
    adapter_config, adapter_tensors = read_adapter(
        case_inputs(CASES_BY_ID["llama-bf16-rank-and-alpha-patterns"]).adapter
    )
    factors = resolve_lora_factors(adapter_config, adapter_tensors)
    rank_and_scale = {name: (lora.rank, lora.scale) for name, lora in factors.items()}
    assert rank_and_scale["model.layers.0.self_attn.q_proj"] == (8, 32 / 8)
    assert rank_and_scale["model.layers.1.self_attn.q_proj"] == (2, 4 / 2)
    assert rank_and_scale["model.layers.1.mlp.down_proj"] == (6, 8 / 6)
    assert rank_and_scale["model.layers.0.mlp.down_proj"] == (4, 8 / 4)
    assert rank_and_scale["model.layers.0.mlp.up_proj"] == (4, 24 / 4)
    assert rank_and_scale["model.layers.1.mlp.gate_proj"] == (4, 24 / 4)
    assert rank_and_scale["model.layers.0.self_attn.o_proj"] == (4, 8 / 4)


@parametrize_cases(MERGE_CASES)
def test_every_tensor_is_within_half_an_ulp_of_the_float64_reference(
    case, case_inputs, lora_merge_output
):
    """Each merged element is the exact merge rounded once to the output dtype (up to the error
    of the specified float32/float64 evaluation), and untouched tensors are only dtype-cast."""
    inputs = case_inputs(case)
    expected = expected_merged_checkpoint(inputs.base, inputs.adapter)
    merged = read_safetensors_directory(lora_merge_output(case))
    dtype = case.output_dtype
    # lora-merge evaluates in float32 for 16-bit outputs and in float64 for float32 outputs.
    unit_roundoff = FLOAT64_UNIT_ROUNDOFF if dtype == torch.float32 else FLOAT32_UNIT_ROUNDOFF

    assert sorted(merged) == sorted(expected)
    failures = []
    adapted_elements = elements_beyond_half_ulp = 0
    expected_beyond_half_ulp = 0.0
    for name, expectation in expected.items():
        output = merged[name]
        assert output.dtype == dtype and output.shape == expectation.source.shape, name
        if expectation.lora is None:
            if not torch.equal(output, expectation.source.to(dtype)):
                failures.append(f"{name}: not an exact dtype cast of its source tensor")
            continue
        error = (output.double() - expectation.exact).abs()
        half_ulp = 0.5 * ulp(output, dtype)
        evaluation_bound = expectation.rounding_error_bound(unit_roundoff)
        allowed = half_ulp + evaluation_bound
        if not (error <= allowed).all():
            failures.append(
                f"{name}: max error {max_in_ulps(error, output, dtype):.3f} ulp, "
                f"{int((error > allowed).sum())} elements beyond the bound"
            )
        adapted_elements += error.numel()
        elements_beyond_half_ulp += int((error > half_ulp).sum())
        expected_beyond_half_ulp += expected_misroundings(evaluation_bound, 2 * half_ulp)

    assert not failures, "\n".join(failures)
    assert adapted_elements > 0
    # Only a float32 evaluation error straddling a rounding midpoint may miss the correctly
    # rounded value, which is rare: no more often than the evaluation bound allows.
    assert elements_beyond_half_ulp <= misrounding_limit(expected_beyond_half_ulp)


@parametrize_cases(MERGE_CASES)
def test_merged_tensors_agree_with_peft_merge_and_unload(
    case, case_inputs, lora_merge_output, peft_reference
):
    """Where PEFT rounds once the result is bit-identical to merge_and_unload(); where PEFT
    rounds twice or at float32 precision, no element is further from the exact merge than
    PEFT's and some element is strictly closer. Untouched tensors are always bit-identical."""
    inputs = case_inputs(case)
    expected = expected_merged_checkpoint(inputs.base, inputs.adapter)
    merged = read_safetensors_directory(lora_merge_output(case))
    peft_state_dict = peft_reference(case).merged_state_dict

    failures = []
    for name, output in merged.items():
        peft_tensor = peft_state_dict[name]
        expectation = expected[name]
        agreement = (
            PeftAgreement.BIT_IDENTICAL
            if expectation.lora is None
            else case.peft_agreement_for(name)
        )
        if agreement is PeftAgreement.BIT_IDENTICAL:
            if not torch.equal(output, peft_tensor):
                differing = int((output != peft_tensor).sum())
                failures.append(f"{name}: {differing}/{output.numel()} elements differ from PEFT")
            continue
        our_error = (output.double() - expectation.exact).abs()
        peft_error = (peft_tensor.double() - expectation.exact).abs()
        if not (our_error <= peft_error).all():
            worse = int((our_error > peft_error).sum())
            failures.append(f"{name}: {worse} elements further from the exact merge than PEFT's")
        if agreement is PeftAgreement.CLOSER_TO_EXACT and not (our_error < peft_error).any():
            failures.append(f"{name}: no element closer to the exact merge than PEFT's")
    assert not failures, "\n".join(failures)


@parametrize_cases(MERGE_CASES)
def test_merged_model_loads_without_peft_and_matches_unmerged_peft_logits(
    case, case_inputs, lora_merge_output, peft_reference
):
    """The output is a plain transformers checkpoint (no adapter files, no missing or unexpected
    weights, dtype from config.json) whose logits match the unmerged PEFT model's."""
    out = lora_merge_output(case)
    assert not ADAPTER_FILE_NAMES & {path.name for path in out.iterdir()}

    model, loading_info = AutoModelForCausalLM.from_pretrained(
        out, dtype="auto", output_loading_info=True
    )
    assert {kind: list(keys) for kind, keys in loading_info.items() if keys} == {}
    assert not any(isinstance(module, LoraLayer) for module in model.modules())
    assert model.dtype == case.output_dtype

    reference = peft_reference(case)
    merged_logits = prompt_logits(model.eval(), dtype=torch.float64)
    unmerged_logits = reference.unmerged_logits.double()
    tolerance = unmerged_tolerance(unmerged_logits, reference.float64_logits, case.output_dtype)
    max_difference = float((merged_logits - unmerged_logits).abs().max())
    assert max_difference <= tolerance, f"{max_difference:.3g} > tolerance {tolerance:.3g}"


@parametrize_cases(MERGE_CASES)
def test_output_has_the_base_checkpoint_tensor_names_and_shapes(
    case, case_inputs, lora_merge_output
):
    """Merging neither adds, drops, renames nor reshapes tensors (a tied lm_head stays absent)."""
    base = read_safetensors_directory(case_inputs(case).base)
    merged = read_safetensors_directory(lora_merge_output(case))
    assert {name: tuple(t.shape) for name, t in merged.items()} == {
        name: tuple(t.shape) for name, t in base.items()
    }


@parametrize_cases(SHARDED_CASES)
def test_sharded_output_has_a_consistent_index(case, case_inputs, lora_merge_output):
    """With a small max_shard_size the output is several shards whose index maps every tensor to
    the one shard that holds it, with the exact total byte size, and each shard respects the
    limit unless it holds a single oversized tensor."""
    out = lora_merge_output(case)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(path.name for path in out.glob("*.safetensors"))
    assert len(shard_files) > 1
    assert not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shard_files

    shard_limit_bytes = kilobytes_to_bytes(case.max_shard_size)
    actual_weight_map = {}
    total_size = 0
    for number, file_name in enumerate(shard_files, start=1):
        assert file_name == f"model-{number:05d}-of-{len(shard_files):05d}.safetensors"
        with safe_open(out / file_name, framework="pt") as shard:
            assert_provenance_metadata(shard.metadata(), case_inputs(case))
            keys = shard.keys()
            tensor_bytes = [shard.get_tensor(key).nbytes for key in keys]
        for key in keys:
            assert key not in actual_weight_map, (
                f"{key} in {file_name} and {actual_weight_map[key]}"
            )
            actual_weight_map[key] = file_name
        assert sum(tensor_bytes) <= shard_limit_bytes or len(keys) == 1, file_name
        total_size += sum(tensor_bytes)
    assert index["weight_map"] == actual_weight_map
    assert index["metadata"]["total_size"] == total_size


@parametrize_cases(SINGLE_FILE_CASES)
def test_unsharded_output_is_a_single_model_safetensors(case, case_inputs, lora_merge_output):
    """With a large max_shard_size everything goes to model.safetensors and no index is written."""
    out = lora_merge_output(case)
    assert sorted(path.name for path in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    with safe_open(out / "model.safetensors", framework="pt") as single_file:
        assert_provenance_metadata(single_file.metadata(), case_inputs(case))


@parametrize_cases(MERGE_CASES)
def test_config_records_the_output_dtype_and_side_files_are_copied(
    case, case_inputs, lora_merge_output
):
    """config.json says the output dtype and is otherwise the base's; generation_config.json is
    carried over unchanged."""
    base, out = case_inputs(case).base, lora_merge_output(case)
    base_config = json.loads((base / "config.json").read_text())
    merged_config = json.loads((out / "config.json").read_text())

    assert merged_config["dtype"] == dtype_name(case.output_dtype)
    assert merged_config.get("torch_dtype", merged_config["dtype"]) == merged_config["dtype"]
    dtype_keys = {"dtype", "torch_dtype"}
    assert {k: v for k, v in merged_config.items() if k not in dtype_keys} == {
        k: v for k, v in base_config.items() if k not in dtype_keys
    }
    base_generation_config = json.loads((base / "generation_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text()) == base_generation_config


def test_cli_writes_the_same_files_as_the_library(tmp_path, case_inputs, lora_merge_output):
    """`python -m lora_merge BASE ADAPTER OUT` exits 0, prints nothing to stdout and writes
    byte-for-byte the files the library call writes for the same options."""
    case = CASES_BY_ID["llama-bf16-alpha-over-r-sharded"]
    inputs = case_inputs(case)
    cli_out = tmp_path / "cli-merged"
    command = [
        sys.executable,
        "-m",
        "lora_merge",
        str(inputs.base),
        str(inputs.adapter),
        str(cli_out),
        "--dtype",
        case.output_dtype_option,
        "--max-shard-size",
        case.max_shard_size,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""
    library_out = lora_merge_output(case)
    library_files = sorted(path.name for path in library_out.iterdir())
    assert sorted(path.name for path in cli_out.iterdir()) == library_files
    for file_name in library_files:
        if file_name == "README.md":
            continue  # the model card records the command line, checked below
        assert (cli_out / file_name).read_bytes() == (library_out / file_name).read_bytes(), (
            file_name
        )
    cli_card, library_card = ((out / "README.md").read_text() for out in (cli_out, library_out))
    assert f"lora-merge {inputs.base} {inputs.adapter} OUT --dtype" in cli_card
    assert "the Python API" in library_card
    differing = set(cli_card.splitlines()) ^ set(library_card.splitlines())
    assert len(differing) == 2, differing  # only the command line


def assert_provenance_metadata(metadata: dict[str, str], inputs) -> None:
    """Each shard's header says its format and what was merged, by which version."""
    assert metadata["format"] == "pt"
    assert metadata["lora_merge.version"] == importlib.metadata.version("lora-merge")
    assert metadata["lora_merge.base"] == str(inputs.base)
    assert metadata["lora_merge.adapter"] == str(inputs.adapter)
    assert "B @ A" in metadata["lora_merge.method"]


def test_cases_cover_every_peft_agreement_kind():
    """Sanity check of the case table itself: each kind of agreement with PEFT is exercised."""
    used = {case.peft_agreement for case in MERGE_CASES}
    used |= {agreement for case in MERGE_CASES for _, agreement in case.peft_agreement_overrides}
    assert used == set(PeftAgreement)
    assert len(set(MERGE_CASE_IDS)) == len(MERGE_CASE_IDS)
