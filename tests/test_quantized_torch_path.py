"""4-bit bases merged by the pure-torch dequantization, with or without bitsandbytes installed.

bitsandbytes has no wheel for some platforms; there lora-merge dequantizes NF4/FP4 bases in
plain torch. These tests need no bitsandbytes at all: the 4-bit checkpoints are written here
in transformers' layout by a small float64 quantizer (nearest code per block-scaled weight),
and the oracle is the format decoded from the file in float64 (quantized_oracle.py). The
merge runs through the installed command's entry point with bitsandbytes made unimportable,
so the torch path is what runs even where bitsandbytes is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_oracle import (
    FLOAT32_UNIT_ROUNDOFF,
    FLOAT64_UNIT_ROUNDOFF,
    read_adapter,
    read_safetensors_directory,
    resolve_lora_factors,
    ulp,
)
from quantized_oracle import decode_4bit
from safetensors.torch import save_file

from lora_merge.compute.dequantize import DEQUANTIZE_CHUNK_ELEMENTS
from lora_merge.inputs.resolve import resolve_base
from lora_merge.io.dequantizing_reader import DequantizingReader, dequantize_workspace_bound
from lora_merge.io.reader import SafetensorsReader
from lora_merge.stream.executor import CPU_TILE_WORKSPACE_BYTES

# bitsandbytes' codebooks (get_4bit_type): NF4, the 16 quantiles of N(0, 1) of the QLoRA paper
# (appendix E); FP4, 1 sign, 2 exponent and 1 mantissa bit in bit-pattern order. Both are
# stored in every checkpoint divided by their largest magnitude, in float32.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FP4_VALUES = (0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3)
NESTED_BLOCKSIZE = 256
COMPUTE_DTYPE = torch.bfloat16
# Rows of 64 with 128-blocks: one scale covers two rows. Rows of 40 with 64-blocks: blocks
# start in the middle of rows. 300 rows of 64 at blocksize 64: 300 scales, so two nested
# (double-quantization) blocks of 256.
WEIGHT_SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (96, 40),
    "model.layers.0.mlp.down_proj.weight": (300, 64),
}
CASES = {
    "nf4-128": ("nf4", 128, False),
    "fp4-64-double": ("fp4", 64, True),
    "nf4-64-double": ("nf4", 64, True),
}


def codebook(quant_type: str) -> torch.Tensor:
    values = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=torch.float32)
    return values / values.abs().max()


def nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code nearest to each value (float64)."""
    return (values.double().reshape(-1, 1) - code.double()).abs().argmin(dim=1)


def block_absmax(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    padded = torch.zeros(-(-values.numel() // blocksize) * blocksize, dtype=torch.float64)
    padded[: values.numel()] = values.double().abs()
    return padded.view(-1, blocksize).amax(dim=1)


def quantize_4bit(
    name: str, weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> dict[str, torch.Tensor]:
    """The tensors transformers stores for one 4-bit weight (QuantState.as_dict(packed=True))."""
    flat = weight.reshape(-1).double()
    absmax = block_absmax(flat, blocksize).float()
    scales = absmax.double().repeat_interleave(blocksize)[: flat.numel()]
    codes = nearest(flat / scales, codebook(quant_type))
    codes = torch.cat([codes, codes.new_zeros(codes.numel() % 2)])
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)
    state: dict[str, object] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
        "shape": list(weight.shape),
    }
    tensors = {name: packed, f"{name}.quant_map": codebook(quant_type)}
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        nested_absmax = block_absmax(centred, NESTED_BLOCKSIZE).float()
        nested_code = torch.linspace(-1, 1, 256, dtype=torch.float32)
        nested_scales = nested_absmax.double().repeat_interleave(NESTED_BLOCKSIZE)
        tensors[f"{name}.absmax"] = nearest(
            centred.double() / nested_scales[: centred.numel()], nested_code
        ).to(torch.uint8)
        tensors[f"{name}.nested_absmax"] = nested_absmax
        tensors[f"{name}.nested_quant_map"] = nested_code
        state.update(
            nested_blocksize=NESTED_BLOCKSIZE, nested_offset=float(offset), nested_dtype="float32"
        )
    else:
        tensors[f"{name}.absmax"] = absmax
    encoded = json.dumps(state).encode()
    tensors[f"{name}.quant_state.bitsandbytes__{quant_type}"] = torch.frombuffer(
        bytearray(encoded), dtype=torch.uint8
    )
    return tensors


def write_4bit_base(folder: Path, quant_type: str, blocksize: int, double_quant: bool) -> Path:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(blocksize + double_quant)
    tensors = {"model.norm.weight": torch.ones(64, dtype=COMPUTE_DTYPE)}
    for name, shape in WEIGHT_SHAPES.items():
        weight = (0.02 * torch.randn(shape, generator=generator)).to(COMPUTE_DTYPE)
        tensors.update(quantize_4bit(name, weight, quant_type, blocksize, double_quant))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    quantization = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
    }
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": quantization})
    )
    return folder


def write_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (rows, columns) in WEIGHT_SHAPES.items():
        module = f"base_model.model.{name.removesuffix('.weight')}"
        tensors[f"{module}.lora_A.weight"] = 0.1 * torch.randn(4, columns, generator=generator)
        tensors[f"{module}.lora_B.weight"] = 0.1 * torch.randn(rows, 4, generator=generator)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    return folder


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def base_4bit(request, tmp_path_factory) -> Path:
    quant_type, blocksize, double_quant = CASES[request.param]
    return write_4bit_base(
        tmp_path_factory.mktemp(request.param) / "base", quant_type, blocksize, double_quant
    )


def test_torch_path_gives_the_formats_bits_in_any_row_range(base_4bit):
    """Read whole, row by row and 7 rows at a time (reads start mid-block), the torch path
    gives exactly the bits of the float64 decoding of the file (FP4's zero code included:
    +0.0, as its quant_map says), blocks indexed over the flattened weight; in fresh
    memory, or reusing the caller's buffer (the stream's tiles) and the thread's workspace."""
    stored = read_safetensors_directory(base_4bit)
    base = resolve_base(base_4bit)
    with DequantizingReader(
        SafetensorsReader(base.entries), base.tensors, "cpu", "torch"
    ) as reader:
        for name in WEIGHT_SHAPES:
            expected = decode_4bit(stored, name).view(torch.int16)
            rows = expected.shape[0]
            for step, buffer_bytes in [(rows, 0), (1, 0), (7, 0), (7, 2**16), (rows, 64)]:
                buffer = torch.empty(buffer_bytes, dtype=torch.uint8) if buffer_bytes else None
                pieces = [
                    reader.read_rows(name, i, min(rows, i + step), buffer).clone()
                    for i in range(0, rows, step)
                ]
                got = torch.cat(pieces).view(torch.int16)
                assert torch.equal(got, expected), f"{name}, {step} rows, buffer {buffer_bytes}"


# Runs the installed command's entry point with bitsandbytes unimportable (a None entry in
# sys.modules makes `import bitsandbytes` raise ImportError), then checks it was never loaded.
WITHOUT_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None
from importlib.metadata import entry_points
(command,) = entry_points(group="console_scripts", name="lora-merge")
sys.argv = ["lora-merge", *sys.argv[1:]]
try:
    command.load()()
finally:
    assert "bitsandbytes.functional" not in sys.modules
"""


def test_merge_without_bitsandbytes_is_the_float64_merge_rounded_once(base_4bit, tmp_path):
    """Every merged weight is decode(W) + s B A, computed in float64 from the file's 4-bit
    format, rounded once to bnb_4bit_compute_dtype (up to the float32 evaluation bound: a
    length-r dot product, the scaling and the sum, (r + 2) unit roundoffs of the magnitudes)."""
    adapter = write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_BITSANDBYTES,
            base_4bit,
            adapter,
            out,
            "--max-memory",
            "4KB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stored = read_safetensors_directory(base_4bit)
    merged = read_safetensors_directory(out)
    assert sorted(merged) == sorted(["model.norm.weight", *WEIGHT_SHAPES])
    assert torch.equal(merged["model.norm.weight"], stored["model.norm.weight"])
    config, tensors = read_adapter(adapter)
    for module, factors in resolve_lora_factors(config, tensors).items():
        name = f"{module}.weight"
        delta, magnitude = factors.delta_and_magnitude()
        weight = decode_4bit(stored, name).double()
        exact = weight + factors.scale * delta
        bound = (
            (factors.rank + 2)
            * (FLOAT32_UNIT_ROUNDOFF + FLOAT64_UNIT_ROUNDOFF)
            * (weight.abs() + factors.scale * magnitude)
        )
        output = merged[name]
        assert output.dtype == COMPUTE_DTYPE
        error = (output.double() - exact).abs()
        assert bool((error <= 0.5 * ulp(output, COMPUTE_DTYPE) + bound).all()), name


def test_dequantization_workspace_stays_within_its_bound_in_the_memory_estimate(tmp_path):
    """A thread that reads a large NF4 (double quant) weight in the stream's CPU tiles, then
    in a row range wider than a dequantization chunk, holds no more workspace than
    dequantize_workspace_bound says for its widest read (the per-thread term of
    --dry-run's memory line): the buffers are reused, never one per tile."""
    rows, columns, blocksize = 2048, 3000, 64  # rows of 3000: blocks start mid-row
    numel = rows * columns
    blocks = numel // blocksize
    name = "model.layers.0.mlp.up_proj.weight"
    generator = torch.Generator().manual_seed(0)
    state = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": "bfloat16",
        "shape": [rows, columns],
        "nested_blocksize": NESTED_BLOCKSIZE,
        "nested_offset": 0.01,
        "nested_dtype": "float32",
    }
    tensors = {
        name: torch.randint(0, 256, (numel // 2, 1), dtype=torch.uint8, generator=generator),
        f"{name}.absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=generator),
        f"{name}.quant_map": codebook("nf4"),
        f"{name}.nested_absmax": torch.rand(-(-blocks // NESTED_BLOCKSIZE), generator=generator),
        f"{name}.nested_quant_map": torch.linspace(-1, 1, 256),
        f"{name}.quant_state.bitsandbytes__nf4": torch.tensor(
            list(json.dumps(state).encode()), dtype=torch.uint8
        ),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    base = resolve_base(tmp_path)
    tile_rows = max(1, CPU_TILE_WORKSPACE_BYTES // (columns * 4))  # as the stream tiles it
    buffer = torch.empty(CPU_TILE_WORKSPACE_BYTES, dtype=torch.uint8)
    with DequantizingReader(
        SafetensorsReader(base.entries), base.tensors, "cpu", "torch"
    ) as reader:
        for start in range(0, rows, tile_rows):
            reader.read_rows(name, start, min(rows, start + tile_rows), buffer)
        held_by_tiles = reader.workspace_nbytes()
        bound = dequantize_workspace_bound(tile_rows * columns, torch.device("cpu"))
        assert 0 < held_by_tiles <= bound
        wide = 3 * DEQUANTIZE_CHUNK_ELEMENTS // columns  # three chunks in one read
        reader.read_rows(name, 5, 5 + wide, buffer)
        assert reader.workspace_nbytes() <= dequantize_workspace_bound(
            wide * columns, torch.device("cpu")
        )
