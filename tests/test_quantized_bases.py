"""QLoRA: merging into bitsandbytes NF4/FP4 and LLM.int8 bases, and the three save methods.

Every quantized base is a real bitsandbytes checkpoint made at test time from
one tiny Llama: by transformers itself (``BitsAndBytesConfig`` on
``device_map="cpu"``, then ``save_pretrained``) where it can, and by
``bnb_checkpoints.py`` (bitsandbytes' ``quantize_4bit``, same layout, checked
byte for byte against transformers' file) for block sizes transformers cannot
choose. The oracles are the quantized formats decoded from the file in float64
(quantized_oracle.py), bitsandbytes' 4-bit quantization, a
float64 merge, and PEFT running the adapter on the quantized model.

bitsandbytes makes these checkpoints and is their oracle: without it (a platform it has no
wheel for) this module is skipped; test_quantized_torch_path.py covers the pure-torch
dequantization there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bnb_checkpoints import quantize_4bit_tensors, save_bitsandbytes_4bit_checkpoint
from merge_oracle import (
    expected_misroundings,
    merge_error_and_bound,
    misrounding_limit,
    read_adapter,
    read_safetensors_directory,
    resolve_lora_factors,
    ulp,
)
from merge_process import LORA_MERGE
from peft import PeftModel
from quantized_oracle import decode_4bit, decode_int8, quant_state_of
from safetensors.torch import save_file
from tiny_checkpoints import prompt_logits, save_random_bf16_llama, save_random_lora_adapter
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lora_merge import MergeOptions, merge
from lora_merge.api import preview_merge
from lora_merge.errors import InvalidInputError, UsageError
from lora_merge.inputs.resolve import resolve_base
from lora_merge.io.dequantizing_reader import DequantizingReader
from lora_merge.io.reader import SafetensorsReader

pytestmark = [
    # The adapter names the 16-bit base it was made on; merging it into the quantized ones is
    # the point.
    pytest.mark.filterwarnings("ignore::lora_merge.errors.LoraMergeWarning"),
    # bitsandbytes (through transformers and bnb_checkpoints.py) makes every base here.
    pytest.mark.bitsandbytes,
]

EXIT_INVALID_INPUT = 4
# Small enough that every weight is merged in many row tiles, most of them
# starting in the middle of a quantization block.
TILED_MAX_MEMORY = "4KB"
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class QuantizedCase:
    """One bitsandbytes format of the tiny base."""

    id: str
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.bfloat16
    by_transformers: bool = False

    @property
    def output_dtype(self) -> torch.dtype:
        # 4-bit: bnb_4bit_compute_dtype; 8-bit: config.json's dtype (the base is bf16).
        return self.compute_dtype if self.bits == 4 else torch.bfloat16


CASES = [
    QuantizedCase("nf4-double-64-bf16", 4, "nf4", True, 64, torch.bfloat16, by_transformers=True),
    QuantizedCase("fp4-64-fp16", 4, "fp4", False, 64, torch.float16, by_transformers=True),
    QuantizedCase("nf4-128-fp16", 4, "nf4", False, 128, torch.float16),
    QuantizedCase("fp4-double-256-bf16", 4, "fp4", True, 256, torch.bfloat16),
    QuantizedCase("int8", 8, by_transformers=True),
]
CASE_BY_ID = {case.id: case for case in CASES}
# bitsandbytes 0.50's CPU inference kernels fail on blocks wider than a row (64 here:
# "shape '[64, 0]' is invalid"), so PEFT can run the quantized model only for these.
CPU_RUNNABLE_CASES = [case for case in CASES if case.bits == 8 or case.blocksize <= 64]


def parametrize_cases(cases: list[QuantizedCase]):
    return pytest.mark.parametrize("case", cases, ids=[case.id for case in cases])


@dataclass
class Checkpoints:
    """The module's inputs, built once: the 16-bit base, the adapter, the quantized bases."""

    root: Path
    base: Path
    adapter: Path
    quantized: dict[str, Path]
    merged: dict[str, Path]


def _save_quantized(case: QuantizedCase, base: Path, directory: Path) -> Path:
    if not case.by_transformers:
        return save_bitsandbytes_4bit_checkpoint(
            base,
            directory,
            quant_type=case.quant_type,
            double_quant=case.double_quant,
            blocksize=case.blocksize,
            compute_dtype=case.compute_dtype,
        )
    if case.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=case.quant_type,
            bnb_4bit_use_double_quant=case.double_quant,
            bnb_4bit_compute_dtype=case.compute_dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, device_map="cpu"
    )
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Checkpoints:
    root = tmp_path_factory.mktemp("quantized")
    # intermediate 384: a down_proj row (384 weights) spans several 64/128-blocks and
    # starts mid-block at 256, and gate/up/down have 384 absmax values at blocksize 64,
    # i.e. two nested (double-quant) blocks of 256.
    base = save_random_bf16_llama(root / "base", intermediate_size=384, seed=4)
    adapter = save_random_lora_adapter(base, root / "adapter", LINEAR_MODULES, seed=5)
    quantized = {case.id: _save_quantized(case, base, root / case.id) for case in CASES}
    merged = {}
    for case in CASES:
        merged[case.id] = root / f"merged-{case.id}"
        merge(
            MergeOptions(
                base=quantized[case.id],
                adapter=adapter,
                out=merged[case.id],
                max_memory=TILED_MAX_MEMORY,
                quiet=True,
                verify=True,
            )
        )
    return Checkpoints(root, base, adapter, quantized, merged)


def dequantized_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized weight of a checkpoint, dequantized whole by the float64 decoding of
    the format from the file's own tensors (quantized_oracle.py: exact on any CPU)."""
    stored = read_safetensors_directory(folder)
    weights = {}
    for key in stored:
        if ".quant_state.bitsandbytes__" in key:
            name = key.split(".quant_state.")[0]
            weights[name] = decode_4bit(stored, name)
        elif key.endswith(".SCB"):
            name = key.removesuffix(".SCB") + ".weight"
            weights[name] = decode_int8(stored, name)
    return weights


@pytest.mark.parametrize("case_id", ["nf4-128-fp16", "fp4-double-256-bf16"])
@pytest.mark.parametrize("backend", ["bitsandbytes", "torch"])
def test_4bit_blocks_that_span_rows_are_indexed_over_the_flattened_weight(
    checkpoints, case_id, backend
):
    """A 4-bit block is ``blocksize`` consecutive elements of the flattened weight: with 64-wide
    rows and 128/256-blocks one scale covers several rows. Both dequantization paths give the
    format's exact bits there (lora-merge hands bitsandbytes the codes as one flat run, never
    the 2-D shape, whose CPU kernel in bitsandbytes 0.50 assumes blocks never cross rows).
    """
    stored = read_safetensors_directory(checkpoints.quantized[case_id])
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = decode_4bit(stored, name)
    assert expected.shape[1] < quant_state_of(stored, name)["blocksize"]  # blocks span rows
    # The case has teeth: reading it with a new block at each row gives other values.
    assert not torch.equal(decode_4bit(stored, name, blocks_follow_rows=True), expected)
    base = resolve_base(checkpoints.quantized[case_id])
    with DequantizingReader(
        SafetensorsReader(base.entries), base.tensors, "cpu", backend
    ) as reader:
        assert torch.equal(reader.read_rows(name), expected)
        rows = expected.shape[0]
        assert torch.equal(
            torch.cat([reader.read_rows(name, i, i + 1) for i in range(rows)]), expected
        )


def test_helper_writes_what_transformers_writes(checkpoints):
    """bnb_checkpoints.py (used for the block sizes transformers cannot choose) writes the same
    file as transformers' save_pretrained, byte for byte, and the same quantization_config."""
    case = CASE_BY_ID["nf4-double-64-bf16"]
    ours = save_bitsandbytes_4bit_checkpoint(
        checkpoints.base,
        checkpoints.root / "helper-nf4",
        quant_type="nf4",
        double_quant=True,
        compute_dtype=case.compute_dtype,
    )
    theirs = checkpoints.quantized[case.id]
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    ours_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    theirs_config = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert ours_config == theirs_config


@parametrize_cases(CASES)
@pytest.mark.parametrize("backend", ["bitsandbytes", "torch"])
def test_dequantized_rows_are_bit_identical_to_the_format(checkpoints, case, backend):
    """Both dequantization paths, read in row ranges that start and end mid-block, give
    exactly the bits of the whole weight's 4-bit decoding / int8_vectorwise_dequant."""
    folder = checkpoints.quantized[case.id]
    expected = dequantized_weights(folder)
    base = resolve_base(folder)
    assert base.quantization is not None
    assert sorted(base.quantization.weights) == sorted(expected)
    compared = 0
    with DequantizingReader(
        SafetensorsReader(base.entries), base.tensors, "cpu", backend
    ) as reader:
        for name, whole in expected.items():
            assert (
                reader.shape(name) == tuple(whole.shape) and reader.dtype(name).torch == whole.dtype
            )
            for step in (3, 7):  # rows per read: most reads start mid-block
                rows = whole.shape[0]
                pieces = [
                    reader.read_rows(name, i, min(rows, i + step)) for i in range(0, rows, step)
                ]
                assert torch.equal(torch.cat(pieces), whole), f"{name}, {step} rows at a time"
            compared += whole.numel()
    assert compared > 0


@parametrize_cases(CASES)
def test_merged_weights_are_within_half_an_ulp_of_float64(checkpoints, case):
    """Every merged element is dequant(W) + scale * B @ A, computed in float64 from the
    dequantized base, rounded once to the output dtype (up to the float32 evaluation bound, rare);
    every other tensor is its base tensor cast to the output dtype."""
    dequantized = dequantized_weights(checkpoints.quantized[case.id])
    stored = read_safetensors_directory(checkpoints.quantized[case.id])
    config, adapter_tensors = read_adapter(checkpoints.adapter)
    factors = {
        f"{name}.weight": f for name, f in resolve_lora_factors(config, adapter_tensors).items()
    }
    merged = read_safetensors_directory(checkpoints.merged[case.id])
    dtype = case.output_dtype

    assert sorted(merged) == logical_names(stored, dequantized)
    elements = beyond_half = 0
    worst = expected_beyond_half = 0.0
    for name, output in merged.items():
        assert output.dtype == dtype, name
        if name not in factors:
            source = dequantized.get(name, stored[name])
            assert torch.equal(output, source.to(dtype)), name
            continue
        error, half_ulp, bound = merge_error_and_bound(
            output, dequantized[name], factors[name], dtype
        )
        assert (error <= half_ulp + bound).all(), name
        elements += error.numel()
        beyond_half += int((error > half_ulp).sum())
        expected_beyond_half += expected_misroundings(bound, 2 * half_ulp)
        worst = max(worst, float((error / ulp(output, dtype)).max()))
    assert elements > 0
    assert beyond_half <= misrounding_limit(expected_beyond_half)
    print(
        f"{case.id}: max error {worst:.4f} ulp, {beyond_half}/{elements} beyond half an ulp "
        f"(limit {misrounding_limit(expected_beyond_half):.1f})"
    )


def logical_names(
    stored: dict[str, torch.Tensor], dequantized: dict[str, torch.Tensor]
) -> list[str]:
    """The checkpoint's tensor names without the quantization's auxiliary tensors."""
    hidden = set()
    for name in dequantized:
        hidden |= {key for key in stored if key.startswith(f"{name}.")}
        hidden |= {f"{name.removesuffix('.weight')}.SCB", f"{name}_format"}
    return sorted(set(stored) - hidden)


@parametrize_cases(CPU_RUNNABLE_CASES)
def test_merged_model_is_plain_and_matches_peft_on_the_quantized_base(checkpoints, case):
    """OUT loads with transformers as an unquantized model of the output dtype, and its logits
    equal PEFT's (adapter active on the bitsandbytes model) to within that model's own noise:
    the distance of PEFT's logits from a float64 evaluation of the merged weights."""
    out = checkpoints.merged[case.id]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == str(case.output_dtype).removeprefix("torch.")
    assert "dequantized from BASE's bitsandbytes" in (out / "README.md").read_text()
    merged_model = AutoModelForCausalLM.from_pretrained(out)
    assert merged_model.dtype == case.output_dtype
    assert not any(
        "4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in merged_model.modules()
    )
    merged_logits = prompt_logits(merged_model)
    reference = prompt_logits(
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64), torch.float64
    )

    quantized_model = AutoModelForCausalLM.from_pretrained(
        checkpoints.quantized[case.id], device_map="cpu"
    )
    # PEFT runs first, on a model that has not run yet: after one plain forward pass,
    # bitsandbytes 0.50 on CPU moves an FP4/fp16 model's PEFT logits 0.05 further from
    # float64 (measured; a bitsandbytes/PEFT interaction, not the adapter).
    peft_model = PeftModel.from_pretrained(quantized_model, checkpoints.adapter).eval()
    peft_logits = prompt_logits(peft_model)
    with peft_model.disable_adapter():
        without_adapter = prompt_logits(peft_model)

    noise = float((peft_logits.double() - reference).abs().max())
    scale = float(reference.abs().max())
    tolerance = 3 * noise + torch.finfo(case.output_dtype).eps * scale
    difference = float((merged_logits - peft_logits).abs().max())
    print(f"{case.id}: |merged - PEFT| {difference:.3g}, noise {noise:.3g}, scale {scale:.3g}")
    assert difference <= tolerance, f"merged vs PEFT {difference:.3g}, noise {noise:.3g}"
    # The check has teeth: the adapter moves the logits by far more than the tolerance.
    assert float((peft_logits - without_adapter).abs().max()) > 5 * tolerance


@pytest.mark.parametrize("case_id", ["nf4-double-64-bf16", "fp4-double-256-bf16"])
def test_merged_4bit_is_what_bitsandbytes_makes_of_the_merge_and_loads_4bit(checkpoints, case_id):
    """merged_4bit, quantizing in small tiles, stores exactly what bitsandbytes' quantize_4bit
    makes of each whole merged weight (in the base's format), keeps quantization_config, and
    transformers loads it as a 4-bit model."""
    case = CASE_BY_ID[case_id]
    base = checkpoints.quantized[case_id]
    out = checkpoints.root / f"merged-4bit-{case_id}"
    # The 16-bit merge in the quant states' dtype is what merged_4bit quantizes.
    merged_16bit = checkpoints.root / f"merged-16bit-bf16-{case_id}"
    for path, method in ((out, "merged_4bit"), (merged_16bit, "merged_16bit")):
        merge(
            MergeOptions(
                base=base,
                adapter=checkpoints.adapter,
                out=path,
                dtype="bf16",
                save_method=method,
                max_memory=TILED_MAX_MEMORY,
                max_shard_size="40KB",
                quiet=True,
            )
        )
    written = read_safetensors_directory(out)
    plain = read_safetensors_directory(merged_16bit)
    base_stored = read_safetensors_directory(base)
    assert sorted(written) == sorted(base_stored)
    quantized_names = [k.split(".quant_state.")[0] for k in base_stored if ".quant_state." in k]
    for name in quantized_names:
        expected = quantize_4bit_tensors(
            name, plain[name], case.quant_type, case.double_quant, case.blocksize
        )
        for key, value in expected.items():
            if ".quant_state." in key:
                assert json.loads(bytes(written[key].tolist())) == json.loads(bytes(value.tolist()))
            else:
                assert torch.equal(written[key], value), key
    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((base / "config.json").read_text())["quantization_config"]
    )
    assert "re-quantized to 4 bits" in (out / "README.md").read_text()  # the model card says so
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    if case in CPU_RUNNABLE_CASES:
        assert torch.isfinite(prompt_logits(model)).all()


def test_merged_4bit_from_a_16bit_base_takes_the_format_from_the_flags(checkpoints, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            LORA_MERGE,
            checkpoints.base,
            checkpoints.adapter,
            out,
            "--save-method",
            "merged_4bit",
            "--quant-type",
            "fp4",
            "--double-quant",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == ("fp4", True)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.quant_state.quant_type == "fp4" and layer.weight.quant_state.nested
    assert type(model.lm_head).__name__ == "Linear"  # as transformers leaves it


def test_save_method_lora_writes_the_adapter_alone(checkpoints, tmp_path):
    """--save-method lora (checked against the 4-bit base, on --device auto = CPU here) writes
    adapter_config.json unchanged and every adapter tensor, which PEFT loads."""
    out = tmp_path / "adapter-out"
    result = subprocess.run(
        [
            LORA_MERGE,
            checkpoints.quantized["nf4-double-64-bf16"],
            checkpoints.adapter,
            out,
            "--save-method",
            "lora",
            "--device",
            "auto",
            "--quiet",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (out / "adapter_config.json").read_bytes() == (
        checkpoints.adapter / "adapter_config.json"
    ).read_bytes()
    original = read_safetensors_directory(checkpoints.adapter)
    written = read_safetensors_directory(out)
    assert sorted(original) == sorted(written)
    assert all(torch.equal(original[k], written[k]) for k in original)
    summary = json.loads(result.stdout)
    assert summary["bytes_written"] == sum(t.numel() * t.element_size() for t in written.values())
    model = AutoModelForCausalLM.from_pretrained(checkpoints.base, dtype=torch.float32)
    PeftModel.from_pretrained(model, out)


def _refused(base: Path, adapter: Path, out: Path, **options: object) -> str:
    """Merge, expecting a refusal with exit code 4 and no OUT; return the message."""
    with pytest.raises(InvalidInputError) as refusal:
        merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, **options))
    assert refusal.value.exit_code == EXIT_INVALID_INPUT
    assert not out.exists()
    return str(refusal.value)


@pytest.mark.parametrize("method", ["hqq", "eetq"])
def test_other_quantization_methods_are_refused_by_name(checkpoints, tmp_path, method):
    base = tmp_path / "base"
    shutil.copytree(checkpoints.base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (base / "config.json").write_text(json.dumps(config))
    message = _refused(base, checkpoints.adapter, tmp_path / "out")
    assert repr(method) in message and "quant_method" in message


def test_incomplete_4bit_group_is_refused_naming_the_tensor(checkpoints, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoints.quantized["nf4-128-fp16"], base)
    tensors = read_safetensors_directory(base)
    missing = "model.layers.0.mlp.up_proj.weight.absmax"
    del tensors[missing]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    message = _refused(base, checkpoints.adapter, tmp_path / "out")
    assert repr(missing) in message


def test_merged_4bit_from_an_8bit_base_is_refused(checkpoints, tmp_path):
    message = _refused(
        checkpoints.quantized["int8"],
        checkpoints.adapter,
        tmp_path / "out",
        save_method="merged_4bit",
    )
    assert "8-bit" in message


def test_without_bitsandbytes_the_torch_path_writes_the_same_model(checkpoints, tmp_path):
    """With bitsandbytes unimportable, a 4-bit base is dequantized by the pure-torch path and
    OUT is byte-identical to the run that used bitsandbytes' kernels."""
    case_id = "fp4-double-256-bf16"
    out = tmp_path / "out"
    script = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # import bitsandbytes -> ImportError
        "from lora_merge import MergeOptions, merge\n"
        f"merge(MergeOptions(base={str(checkpoints.quantized[case_id])!r}, "
        f"adapter={str(checkpoints.adapter)!r}, out={str(out)!r}, "
        f"max_memory={TILED_MAX_MEMORY!r}, quiet=True))\n"
        "assert 'bitsandbytes.functional' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    expected = checkpoints.merged[case_id]
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()


def test_dry_run_reads_a_quantized_base_without_writing(checkpoints, tmp_path):
    preview = preview_merge(
        MergeOptions(
            base=checkpoints.quantized["fp4-64-fp16"],
            adapter=checkpoints.adapter,
            out=tmp_path / "out",
        )
    )
    assert preview.quantization == "bitsandbytes fp4 (blocksize 64), 7 weights"
    assert preview.lora_modules_by_layer == {"linear": 7}
    assert preview.dtypes_out == {"float16": 12}  # bnb_4bit_compute_dtype, auxiliaries left out
    assert not (tmp_path / "out").exists()
    overridden = preview_merge(
        MergeOptions(
            base=checkpoints.quantized["fp4-64-fp16"],
            adapter=checkpoints.adapter,
            out=tmp_path / "out",
            dtype="fp32",
        )
    )
    assert overridden.dtypes_out == {"float32": 12}  # --dtype wins


MEMORY_PROBE = """
import resource, sys
from lora_merge import MergeOptions, merge
from lora_merge.compute.bitsandbytes_backend import load_bitsandbytes
load_bitsandbytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge(MergeOptions(base=sys.argv[1], adapter=sys.argv[2], out=sys.argv[3], quiet=True))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # KiB on Linux
"""


def test_a_large_quantized_weight_is_merged_in_bounded_memory(tmp_path):
    """A 4096 x 4096 NF4 weight (32 MiB once dequantized to bf16, 64 MiB in float32) is
    dequantized and merged a tile at a time: the merge's peak RSS grows by far less.
    (Dequantizing it whole grows the peak RSS by 44 MiB with bitsandbytes' kernel and
    210 MiB with the torch path, measured, so the bound has teeth.)"""
    side = 4096
    name = "model.layers.0.mlp.up_proj.weight"
    weight = (torch.randn(side, side, generator=torch.Generator().manual_seed(0)) * 0.02).to(
        torch.bfloat16
    )
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file(quantize_4bit_tensors(name, weight, "nf4", True, 64), base / "model.safetensors")
    del weight
    quantization = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": quantization})
    )
    lora = {
        f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight": torch.randn(2, side),
        f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight": torch.randn(side, 2),
    }
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, base, adapter, tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    growth_mib = int(result.stdout.split()[-1]) / 1024
    dequantized_mib = side * side * 2 / 2**20
    assert growth_mib < dequantized_mib / 2, f"peak RSS grew {growth_mib:.0f} MiB"
    print(
        f"peak RSS growth {growth_mib:.1f} MiB for a {dequantized_mib:.0f} MiB dequantized weight"
    )


def test_16bit_weights_with_a_bitsandbytes_config_merge_as_an_ordinary_base(checkpoints, tmp_path):
    """Some repos ship 16-bit weights with a quantization_config so that from_pretrained
    quantizes on load: with no quantized tensor, the base is an ordinary one and OUT keeps
    the config as the base has it."""
    base = tmp_path / "base"
    shutil.copytree(checkpoints.base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = json.loads(
        (checkpoints.quantized["nf4-double-64-bf16"] / "config.json").read_text()
    )["quantization_config"]
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    summary = merge(MergeOptions(base=base, adapter=checkpoints.adapter, out=out, quiet=True))
    assert summary.lora_modules == 7 and summary.copied == 5
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]
        == config["quantization_config"]
    )


def test_save_method_lora_refuses_a_combination(checkpoints, tmp_path):
    """--save-method lora writes one adapter as it is: several adapters are a usage error."""
    out = tmp_path / "out"
    with pytest.raises(UsageError) as refusal:
        merge(
            MergeOptions(
                base=checkpoints.base,
                adapter=[checkpoints.adapter, checkpoints.adapter],
                out=out,
                save_method="lora",
                quiet=True,
            )
        )
    assert refusal.value.exit_code == 2 and "--save-method lora" in str(refusal.value)
    assert not out.exists()
