"""Integer-quantized bases (compressed-tensors pack-quantized / int-quantized, GPTQ, AWQ).

Oracles:
- compressed-tensors' own compressor writes the packed tensors and its own
  decompressor (``PackedQuantizationCompressor.decompress``,
  ``IntQuantizationCompressor.decompress``) is the decoder our bits must equal;
- GPTQ and AWQ have no CPU-runnable writer or decoder (GPTQModel needs a CUDA torch,
  AutoAWQ and AutoGPTQ CUDA extensions): ``tests/integer_checkpoints.py`` rebuilds
  their packers' layouts from the sources it cites;
- every decoder is also checked against the format decoded in float64 from its
  definition (``tests/integer_checkpoints.py``); the product there is exact, so its
  one rounding to the scales' dtype must give our bits exactly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from integer_checkpoints import (
    awq_float64,
    column_packed_float64,
    compressed_tensors_decompressed,
    compressed_tensors_float64,
    gptq_float64,
    pack_awq,
    pack_gptq,
    save_awq_base,
    save_compressed_tensors_base,
    save_gptq_base,
)
from merge_oracle import (
    merge_error_and_bound,
    read_adapter,
    read_safetensors_directory,
    resolve_lora_factors,
)
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tiny_checkpoints import save_tiny_base_checkpoint
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.compute.integer_dequantize import (
    dequantize_codes,
    unpack_awq_codes,
    unpack_codes,
    unpack_codes_down_columns,
)
from lora_merge.errors import EXIT_INVALID_INPUT, LoraMergeError
from lora_merge.io.formats import integer_weights

SCALE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def compressed_tensors_weight(
    rows: int,
    columns: int,
    bits: int,
    strategy: str,
    symmetric: bool,
    scale_dtype: torch.dtype,
    group_size: int | None = None,
    seed: int = 0,
):
    """A weight compressed by compressed-tensors' ``pack-quantized`` compressor, its scheme,
    and the compressor's stored tensors."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors 0.20 needs Python 3.11")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    generator = torch.Generator().manual_seed(seed)
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=group_size
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = 1 if strategy == "tensor" else (columns // group_size if group_size else 1)
    scale_shape = (1,) if strategy == "tensor" else (rows, groups)
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    state = {
        "weight": torch.randn(rows, columns, generator=generator).to(scale_dtype),
        "weight_scale": (torch.rand(scale_shape, generator=generator) * 0.1 + 1e-3).to(scale_dtype),
        "weight_zero_point": torch.randint(low, high, scale_shape, generator=generator).to(
            torch.int8
        ),
    }
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    reference = PackedQuantizationCompressor.decompress(compressed, scheme)["weight"]
    return compressed, reference


def decode_compressed_tensors(compressed, rows, columns, bits, group_size):
    """Our decoders on compressed-tensors' stored tensors, the way the format module calls them."""
    codes = unpack_codes(compressed["weight_packed"], bits)[:, :columns]
    scale = compressed["weight_scale"]
    zero_point = compressed.get("weight_zero_point")
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(rows, 1)
    if zero_point is None:
        zeros: torch.Tensor | int = 1 << (bits - 1)
    elif zero_point.dtype == torch.int32:
        zeros = unpack_codes_down_columns(zero_point, bits)[:rows]
    else:
        zeros = (zero_point.to(torch.int32) + (1 << (bits - 1))).reshape(1, 1).expand(rows, 1)
    return dequantize_codes(codes, scale, zeros, group_size, scale.dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "strategy,group_size", [("group", 32), ("group", 128), ("channel", None), ("tensor", None)]
)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_pack_quantized_decodes_to_compressed_tensors_bits(
    bits, symmetric, strategy, group_size, scale_dtype
):
    # 24 rows: the zero points' packed words straddle the row count (8 per word at 4 bits
    # is exact, 3 words; 4 per word at 8 bits, 6 words); 256 columns, two 128-groups.
    rows, columns = 24, 256
    compressed, reference = compressed_tensors_weight(
        rows, columns, bits, strategy, symmetric, scale_dtype, group_size
    )
    ours = decode_compressed_tensors(compressed, rows, columns, bits, group_size or columns)
    assert ours.dtype == reference.dtype == scale_dtype
    assert torch.equal(ours, reference)
    float64 = compressed_tensors_float64(
        compressed["weight_packed"],
        compressed["weight_scale"],
        compressed.get("weight_zero_point"),
        (rows, columns),
        bits,
        group_size or columns,
    )
    assert torch.equal(ours, float64.to(scale_dtype))


def test_pack_quantized_columns_not_a_multiple_of_the_word():
    # 4-bit codes of 20 columns fill two and a half words: the packer pads the last word.
    compressed, reference = compressed_tensors_weight(5, 20, 4, "channel", False, torch.bfloat16)
    assert compressed["weight_packed"].shape == (5, 3)
    assert torch.equal(decode_compressed_tensors(compressed, 5, 20, 4, 20), reference)


def test_unpack_codes_bit_order_by_hand():
    # 0x76543210: code k of a 4-bit word is k; 0x04030201 at 8 bits: 1, 2, 3, 4.
    assert unpack_codes(torch.tensor([[0x76543210]], dtype=torch.int32), 4).tolist() == [
        list(range(8))
    ]
    assert unpack_codes(torch.tensor([[0x04030201]], dtype=torch.int32), 8).tolist() == [
        [1, 2, 3, 4]
    ]
    # A negative word (the top code >= 8): its bits, not its sign, are the codes.
    word = torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32)
    assert unpack_codes(word, 4).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert unpack_codes(torch.tensor([[0x1B]], dtype=torch.int32), 2).tolist()[0][:4] == [
        3,
        2,
        1,
        0,
    ]


def test_awq_pack_order_by_hand():
    # AutoAWQ puts column [0, 2, 4, 6, 1, 3, 5, 7][k] of a run of eight in slot k.
    word = sum(column << (4 * slot) for slot, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
    assert unpack_awq_codes(torch.tensor([[word]], dtype=torch.int32)).tolist() == [list(range(8))]


def gptq_layer(
    inputs: int,
    outputs: int,
    bits: int,
    group_size: int,
    desc_act: bool,
    checkpoint_format: str,
    seed: int = 0,
):
    """Random GPTQ tensors: qweight, qzeros, scales (float16), g_idx."""
    generator = torch.Generator().manual_seed(seed)
    groups = inputs // group_size
    codes = torch.randint(0, 1 << bits, (inputs, outputs), generator=generator)
    # v1 zero points lie in 1 .. 2**bits - 1 (see pack_gptq); v2 in 0 .. 2**bits - 1.
    low = 1 if checkpoint_format == "gptq" else 0
    zeros = torch.randint(low, 1 << bits, (groups, outputs), generator=generator)
    scales = (torch.rand(groups, outputs, generator=generator) * 0.02 + 1e-4).half()
    g_idx = torch.arange(inputs, dtype=torch.int32) // group_size
    if desc_act:
        # desc_act: the columns were quantized in another order, each keeping its group.
        g_idx = g_idx[torch.randperm(inputs, generator=generator)]
    qweight, qzeros = pack_gptq(codes, zeros, bits, checkpoint_format)
    return qweight, qzeros, scales, g_idx


def decode_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format):
    codes = unpack_codes_down_columns(qweight, bits).t()
    zeros = unpack_codes_down_columns(qzeros.t().contiguous(), bits).t()
    zeros = zeros.to(torch.int32) + (1 if checkpoint_format == "gptq" else 0)
    return dequantize_codes(
        codes, scales.t(), zeros.t(), 0, scales.dtype, column_groups=g_idx.long()
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_decodes_to_float64_definition(bits, desc_act, checkpoint_format):
    qweight, qzeros, scales, g_idx = gptq_layer(128, 48, bits, 32, desc_act, checkpoint_format)
    ours = decode_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    reference = gptq_float64(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    assert ours.dtype == torch.float16
    assert torch.equal(ours, reference.to(torch.float16))


def test_awq_decodes_to_float64_definition():
    generator = torch.Generator().manual_seed(1)
    inputs, outputs, group_size = 128, 64, 32
    codes = torch.randint(0, 16, (inputs, outputs), generator=generator)
    zeros = torch.randint(0, 16, (inputs // group_size, outputs), generator=generator)
    scales = (torch.rand(inputs // group_size, outputs, generator=generator) * 0.02).half()
    qweight, qzeros = pack_awq(codes, zeros)
    ours = dequantize_codes(
        unpack_awq_codes(qweight).t(),
        scales.t(),
        unpack_awq_codes(qzeros).t(),
        group_size,
        torch.float16,
    )
    assert torch.equal(ours, awq_float64(qweight, qzeros, scales, group_size).to(torch.float16))


# --- whole merges ------------------------------------------------------------------------

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tiles of a few rows, so that a tile starts inside a packed zero-point word and a GPTQ/AWQ
# band is cut into several tiles.
TILED_MAX_MEMORY = "4KB"


@dataclass(frozen=True)
class IntCase:
    id: str
    weights: dict
    format: str = "pack-quantized"
    input_activations: dict | None = None


COMPRESSED_TENSORS_CASES = [
    IntCase(
        "w4a16-group32-asym",
        {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
    ),
    IntCase("w4a16-channel-sym", {"num_bits": 4, "symmetric": True, "strategy": "channel"}),
    IntCase(
        "w8a16-group64-sym",
        {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 64},
    ),
    IntCase(
        "w8a8-int8-channel",
        {"num_bits": 8, "symmetric": True, "strategy": "channel"},
        format="int-quantized",
        input_activations={"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True},
    ),
]


@dataclass(frozen=True)
class IntCheckpoints:
    base: Path
    adapter: Path
    quantized: dict[str, Path]
    merged: dict[str, Path]


@pytest.fixture(scope="module")
def int_checkpoints(tmp_path_factory) -> IntCheckpoints:
    pytest.importorskip("compressed_tensors", reason="compressed-tensors 0.20 needs Python 3.11")
    root = tmp_path_factory.mktemp("native-int")
    base = save_tiny_base_checkpoint("llama", torch.bfloat16, root / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(7)  # init_lora_weights=False draws A and B (B != 0) from torch's RNG
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR_MODULES, init_lora_weights=False)
    adapter = root / "adapter"
    get_peft_model(model, lora).save_pretrained(adapter)
    quantized, merged = {}, {}
    for case in COMPRESSED_TENSORS_CASES:
        quantized[case.id] = save_compressed_tensors_base(
            base, root / case.id, case.weights, case.format, case.input_activations
        )
        merged[case.id] = root / f"merged-{case.id}"
        merge(
            MergeOptions(
                base=quantized[case.id],
                adapter=adapter,
                out=merged[case.id],
                max_memory=TILED_MAX_MEMORY,
                quiet=True,
            )
        )
    return IntCheckpoints(base, adapter, quantized, merged)


def assert_merged_within_half_an_ulp(
    merged_folder: Path,
    dequantized: dict[str, torch.Tensor],
    stored: dict,
    adapter: Path,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Every merged weight is dequant(W) + scale * B @ A computed in float64 from the
    reference decoder's weights, rounded once to the output dtype, up to the float32
    evaluation bound; every other tensor is the base's own, in its own dtype (issue 21:
    what the format left unquantized passes through as it is)."""
    config, adapter_tensors = read_adapter(adapter)
    factors = {
        f"{name}.weight": f for name, f in resolve_lora_factors(config, adapter_tensors).items()
    }
    merged = read_safetensors_directory(merged_folder)
    assert set(dequantized) <= set(merged)
    merged_weights = 0
    for name, output in merged.items():
        if name not in dequantized:
            assert output.dtype == stored[name].dtype, name
            assert torch.equal(output, stored[name]), name
            continue
        assert output.dtype == dtype, name
        if name not in factors:
            assert torch.equal(output, dequantized[name].to(dtype)), name
            continue
        error, half_ulp, bound = merge_error_and_bound(
            output, dequantized[name], factors[name], dtype
        )
        assert (error <= half_ulp + bound).all(), name
        merged_weights += 1
    assert merged_weights == len(dequantized) > 0


@pytest.mark.parametrize("case", COMPRESSED_TENSORS_CASES, ids=lambda c: c.id)
def test_compressed_tensors_base_merges_as_its_decompressor_reads_it(int_checkpoints, case):
    quantized = int_checkpoints.quantized[case.id]
    dequantized = compressed_tensors_decompressed(quantized)
    stored = read_safetensors_directory(quantized)
    assert_merged_within_half_an_ulp(
        int_checkpoints.merged[case.id], dequantized, stored, int_checkpoints.adapter
    )
    out = int_checkpoints.merged[case.id]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    # No auxiliary tensor (scales, zero points, shapes, activation scales) reaches OUT.
    merged_names = set(read_safetensors_directory(out))
    assert not any("_scale" in n or "zero_point" in n or "_packed" in n for n in merged_names)
    assert merged_names == set(read_safetensors_directory(int_checkpoints.base))


def test_compressed_tensors_merge_matches_peft_on_the_decompressed_base(int_checkpoints, tmp_path):
    """Logits of OUT equal PEFT's on the base as compressed-tensors decompresses it, to within
    the noise of PEFT's own bfloat16 evaluation against float64."""
    from peft import PeftModel
    from tiny_checkpoints import prompt_logits

    case = COMPRESSED_TENSORS_CASES[0]
    dequantized_base = tmp_path / "dequantized"
    shutil.copytree(int_checkpoints.base, dequantized_base)
    tensors = read_safetensors_directory(dequantized_base)
    tensors.update(compressed_tensors_decompressed(int_checkpoints.quantized[case.id]))
    for shard in dequantized_base.glob("*.safetensors*"):
        shard.unlink()
    save_file(tensors, dequantized_base / "model.safetensors", metadata={"format": "pt"})
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(dequantized_base, dtype=torch.bfloat16),
        int_checkpoints.adapter,
    ).eval()
    peft_logits = prompt_logits(peft_model)
    with peft_model.disable_adapter():
        without_adapter = prompt_logits(peft_model)
    out = int_checkpoints.merged[case.id]
    merged_logits = prompt_logits(AutoModelForCausalLM.from_pretrained(out))
    reference = prompt_logits(
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64), torch.float64
    )
    noise = float((peft_logits.double() - reference).abs().max())
    tolerance = 3 * noise + torch.finfo(torch.bfloat16).eps * float(reference.abs().max())
    assert float((merged_logits - peft_logits).abs().max()) <= tolerance
    assert float((peft_logits - without_adapter).abs().max()) > 5 * tolerance


def refused(base: Path, adapter: Path, out: Path, **options) -> str:
    with pytest.raises(LoraMergeError) as refusal:
        merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True, **options))
    assert refusal.value.exit_code == EXIT_INVALID_INPUT
    assert not out.exists()
    message = str(refusal.value)
    assert "\n" not in message
    return message


def broken_copy(source: Path, destination: Path, edit) -> Path:
    """A copy of a one-file checkpoint whose tensors (and config) ``edit`` changes in place."""
    shutil.copytree(source, destination)
    tensors = read_safetensors_directory(destination)
    config = json.loads((destination / "config.json").read_text())
    edit(tensors, config)
    for shard in destination.glob("*.safetensors*"):
        shard.unlink()
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    (destination / "config.json").write_text(json.dumps(config))
    return destination


LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "problem,edit,expected",
    [
        (
            "missing scale",
            lambda t, c: t.pop(f"{LAYER}.weight_scale"),
            f"'{LAYER}.weight_scale'",
        ),
        (
            "missing zero point",
            lambda t, c: t.pop(f"{LAYER}.weight_zero_point"),
            f"'{LAYER}.weight_zero_point'",
        ),
        (
            "scales of another group size",
            lambda t, c: t.update(
                {f"{LAYER}.weight_scale": t[f"{LAYER}.weight_scale"][:, :2].clone()}
            ),
            "do not fit the group size",
        ),
        (
            "NaN scale",
            lambda t, c: t[f"{LAYER}.weight_scale"].view(-1)[3:4].fill_(float("nan")),
            "NaN or Inf",
        ),
        (
            "packed size against weight_shape",
            lambda t, c: t.update(
                {f"{LAYER}.weight_packed": t[f"{LAYER}.weight_packed"][:, :8].clone()}
            ),
            "does not match its shape",
        ),
        (
            "unknown quant_method",
            lambda t, c: c["quantization_config"].update({"quant_method": "hqq"}),
            "'hqq'",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_bad_compressed_tensors_input_is_refused_in_one_line(
    int_checkpoints, tmp_path, problem, edit, expected
):
    base = broken_copy(int_checkpoints.quantized["w4a16-group32-asym"], tmp_path / "base", edit)
    message = refused(base, int_checkpoints.adapter, tmp_path / "out")
    assert expected in message, message


def test_merged_native_is_refused_naming_llm_compressor(int_checkpoints, tmp_path):
    message = refused(
        int_checkpoints.quantized["w4a16-group32-asym"],
        int_checkpoints.adapter,
        tmp_path / "out",
        save_method="merged_native",
    )
    assert "llm-compressor" in message and "calibration" in message


COLUMN_PACKED_CASES = {
    "gptq-4bit-g32-v1": lambda base, d: save_gptq_base(base, d, 4, 32, False, "gptq"),
    "gptq-4bit-g32-desc-act-v2": lambda base, d: save_gptq_base(base, d, 4, 32, True, "gptq_v2"),
    "gptq-8bit-per-row-v1": lambda base, d: save_gptq_base(base, d, 8, -1, False, "gptq"),
    "gptq-2bit-g16-desc-act-v1": lambda base, d: save_gptq_base(base, d, 2, 16, True, "gptq"),
    "awq-4bit-g32": lambda base, d: save_awq_base(base, d, 32),
}


@pytest.mark.parametrize("band", ["one band", "narrow bands"])
@pytest.mark.parametrize("case_id", list(COLUMN_PACKED_CASES))
def test_gptq_and_awq_bases_merge_as_their_format_decodes(
    int_checkpoints, tmp_path, monkeypatch, case_id, band
):
    """The layouts of the packers' sources (tests/integer_checkpoints.py), tiles of a few rows:
    each merged weight is the float64 decoding of the format, rounded to float16 (the
    reference decoders' dtype), plus the LoRA product, rounded once. With narrow bands a
    band holds a few rows (its columns of qweight read row by row) and is decoded in chunks
    of a group or two, so that bands and chunks end inside the weight; AWQ's packed words
    of the next bands are gathered a few rows at a time, kept for the bands that follow and
    gathered again past them."""
    if band == "narrow bands":
        monkeypatch.setattr(integer_weights, "BAND_ELEMENTS", 256)
        monkeypatch.setattr(integer_weights, "VALUES_CHUNK", 512)
        monkeypatch.setattr(integer_weights, "AWQ_ROWS_READ_BYTES", 100)
    quantized = COLUMN_PACKED_CASES[case_id](int_checkpoints.base, tmp_path / "base")
    out = tmp_path / "out"
    merge(
        MergeOptions(
            base=quantized,
            adapter=int_checkpoints.adapter,
            out=out,
            max_memory=TILED_MAX_MEMORY,
            quiet=True,
        )
    )
    dequantized = {n: w.to(torch.float16) for n, w in column_packed_float64(quantized).items()}
    stored = read_safetensors_directory(quantized)
    assert_merged_within_half_an_ulp(
        out, dequantized, stored, int_checkpoints.adapter, torch.float16
    )
    assert set(read_safetensors_directory(out)) == set(
        read_safetensors_directory(int_checkpoints.base)
    )


@pytest.mark.parametrize(
    "problem,edit,expected",
    [
        ("missing qzeros", lambda t, c: t.pop(f"{LAYER}.qzeros"), f"'{LAYER}.qzeros'"),
        ("missing scales", lambda t, c: t.pop(f"{LAYER}.scales"), f"'{LAYER}.scales'"),
        (
            "scales of another group size",
            lambda t, c: c["quantization_config"].update({"group_size": 16}),
            "do not fit the group size",
        ),
        (
            "NaN scale",
            lambda t, c: t[f"{LAYER}.scales"].view(-1)[5:6].fill_(float("inf")),
            "NaN or Inf",
        ),
        (
            "packed codes of another dtype",
            lambda t, c: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].float()}),
            "does not match its shape",
        ),
        (
            "3-bit",
            lambda t, c: c["quantization_config"].update({"bits": 3}),
            "3-bit codes straddle words",
        ),
        (
            "marlin layout",
            lambda t, c: c["quantization_config"].update({"checkpoint_format": "marlin"}),
            "'marlin'",
        ),
    ],
    ids=lambda v: v if (isinstance(v, str) and " " in v) or v == "3-bit" else "",
)
def test_bad_gptq_input_is_refused_in_one_line(int_checkpoints, tmp_path, problem, edit, expected):
    gptq = save_gptq_base(int_checkpoints.base, tmp_path / "gptq", 4, 32, False, "gptq")
    base = broken_copy(gptq, tmp_path / "base", edit)
    message = refused(base, int_checkpoints.adapter, tmp_path / "out")
    assert expected in message, message


def test_awq_layouts_other_than_gemm_are_refused_by_name(int_checkpoints, tmp_path):
    awq = save_awq_base(int_checkpoints.base, tmp_path / "awq", 32)
    base = broken_copy(
        awq, tmp_path / "base", lambda t, c: c["quantization_config"].update({"version": "gemv"})
    )
    assert "'gemv'" in refused(base, int_checkpoints.adapter, tmp_path / "out")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_merged_native_is_refused_for_gptq_and_awq(int_checkpoints, tmp_path, method):
    if method == "gptq":
        base = save_gptq_base(int_checkpoints.base, tmp_path / "base", 4, 32, False, "gptq")
    else:
        base = save_awq_base(int_checkpoints.base, tmp_path / "base", 32)
    message = refused(base, int_checkpoints.adapter, tmp_path / "out", save_method="merged_native")
    assert method.upper() in message and "llm-compressor" in message
