"""4-bit bases on a CUDA GPU: the same bits as bitsandbytes' CUDA kernel and as the CPU.

Skipped, with the reason, where torch sees no CUDA device (these tests are written to
run unchanged the day one is there). The oracles:

- bitsandbytes' own CUDA kernels (``quantize_4bit`` / ``dequantize_4bit`` on the GPU),
  and the format decoded from the tensors in float64 (quantized_oracle.py);
- the same merge run with ``device="cpu"``, byte for byte (README: "with the same
  bits either way");
- ``torch.cuda.max_memory_allocated`` against the ``max_memory`` budget the merge was given.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from bnb_checkpoints import quantize_4bit_tensors, save_bitsandbytes_4bit_checkpoint
from handmade_checkpoints import write_adapter, write_base
from quantized_oracle import (
    assert_bitsandbytes_bits_but_fp4_negative_zeros,
    decode_4bit,
)
from quantized_oracle import float_bits as bits
from safetensors.torch import save_file

from lora_merge import MergeOptions, merge
from lora_merge.inputs.resolve import resolve_base
from lora_merge.io.dequantizing_reader import DequantizingReader
from lora_merge.io.reader import SafetensorsReader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.bitsandbytes,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: these compare lora-merge's CUDA path with bitsandbytes' "
        "CUDA kernels and with the CPU",
    ),
    # The handmade adapter names no base; quantized bases may warn about it.
    pytest.mark.filterwarnings("ignore::lora_merge.errors.LoraMergeWarning"),
]

NAME = "model.layers.0.mlp.up_proj.weight"
# (rows, columns): blocks of 64 that start mid-row, an odd row count, a 4096-long row.
SHAPES = [(96, 40), (301, 64), (8, 4096)]


def quantized_on_the_gpu(
    shape: tuple[int, int],
    quant_type: str,
    double_quant: bool,
    blocksize: int,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A weight quantized by bitsandbytes on the GPU: its stored tensors (on the CPU, as
    transformers saves them) and bitsandbytes' CUDA dequantization of it."""
    import bitsandbytes.functional as bnb_functional

    generator = torch.Generator().manual_seed(sum(shape) + blocksize)
    weight = (torch.randn(shape, generator=generator) * 0.02).to(dtype).cuda()
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    # Dequantized as one flat run: bitsandbytes' CPU kernel (not its CUDA one) treats a 2-D
    # shape as rows of whole blocks and misreads blocks that span rows (301 x 64 at blocksize
    # 128: 17 268 of 19 264 values wrong, measured with bitsandbytes 0.50.2).
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([math.prod(shape)])
    reference = bnb_functional.dequantize_4bit(packed, flat_state)
    assert reference.is_cuda and reference.dtype == dtype
    stored = {NAME: packed.cpu()}
    for key, value in state.as_dict(packed=True).items():
        stored[f"{NAME}.{key}"] = value.cpu()
    return stored, reference.reshape(shape)


def read_in_tiles(folder: Path, device: str, backend: str, tile_rows: int) -> torch.Tensor:
    """The weight read back through DequantizingReader in tiles of ``tile_rows`` rows,
    each into a reused CPU buffer as the stream passes one, copied out to the CPU."""
    base = resolve_base(folder)
    rows = base.tensors[NAME].shape[0]
    buffer = torch.empty(2**20, dtype=torch.uint8)
    parts = []
    with DequantizingReader(SafetensorsReader(base.entries), base.tensors, device, backend) as r:
        for start in range(0, rows, tile_rows):
            tile = r.read_rows(NAME, start, min(rows, start + tile_rows), buffer)
            assert tile.device.type == torch.device(device).type
            parts.append(tile.cpu().clone())
    return torch.cat(parts)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    ("quant_type", "double_quant", "blocksize", "dtype"),
    [
        ("nf4", True, 64, torch.bfloat16),
        ("nf4", False, 128, torch.float16),
        ("fp4", True, 64, torch.float32),
        ("fp4", False, 256, torch.bfloat16),
    ],
    ids=["nf4-double-64-bf16", "nf4-128-fp16", "fp4-double-64-fp32", "fp4-256-bf16"],
)
def test_cuda_dequantization_has_the_bits_of_bitsandbytes_cuda_and_of_the_cpu(
    tmp_path, shape, quant_type, double_quant, blocksize, dtype
):
    """Read in tiles that start mid-block, lora-merge's own kernels give the format's bits
    (decoded in float64) on the GPU as on the CPU; bitsandbytes' CUDA kernel gives them
    too, whole or through the reader's tiles, but for FP4's negative zero."""
    stored, reference = quantized_on_the_gpu(shape, quant_type, double_quant, blocksize, dtype)
    save_file(stored, tmp_path / "model.safetensors")
    exact = decode_4bit(stored, NAME)
    assert_bitsandbytes_bits_but_fp4_negative_zeros(reference, exact)
    if quant_type == "nf4":
        assert torch.equal(bits(reference), bits(exact))
    for device, backend in [("cuda", "torch"), ("cuda", "bitsandbytes"), ("cpu", "torch")]:
        for tile_rows in (1, 7, shape[0]):
            values = read_in_tiles(tmp_path, device, backend, tile_rows)
            assert values.dtype == dtype and tuple(values.shape) == shape
            if backend == "torch":
                assert torch.equal(bits(values), bits(exact)), (device, tile_rows)
            else:
                assert_bitsandbytes_bits_but_fp4_negative_zeros(values, exact)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A bf16 base, its NF4 (double quant) and FP4 copies, and an adapter for them."""
    root = tmp_path_factory.mktemp("gpu-inputs")
    write_base(root / "bf16", shards=2)
    write_adapter(root / "adapter")
    nf4 = save_bitsandbytes_4bit_checkpoint(
        root / "bf16", root / "nf4", quant_type="nf4", double_quant=True, blocksize=64
    )
    fp4 = save_bitsandbytes_4bit_checkpoint(
        root / "bf16", root / "fp4", quant_type="fp4", double_quant=False, blocksize=128
    )
    adapter = root / "adapter"
    return {"bf16": (root / "bf16", adapter), "nf4": (nf4, adapter), "fp4": (fp4, adapter)}


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("case", ["bf16", "nf4", "fp4"])
@pytest.mark.parametrize("max_memory", ["1GiB", "4KB"], ids=["whole", "tiled"])
def test_cuda_merge_writes_the_bytes_of_the_cpu_merge(inputs, tmp_path, case, max_memory):
    """``--device cuda`` and ``--device cpu`` write the same shards, byte for byte, in
    one tile or in many (a 4 KB budget starts most tiles mid-block)."""
    base, adapter = inputs[case]
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        merge(
            MergeOptions(
                base=base,
                adapter=adapter,
                out=out,
                device=device,
                max_memory=max_memory,
                quiet=True,
                hash_inputs=False,
            )
        )
        outputs[device] = safetensors_bytes(out)
    assert outputs["cpu"], "the merge wrote no shards"
    assert outputs["cuda"] == outputs["cpu"]


def test_cuda_merge_of_a_large_4bit_weight_stays_within_the_memory_budget(tmp_path):
    """A 4096 x 4096 NF4 weight (32 MiB in bf16, 64 MiB in float32) merged on the GPU
    with a 32 MiB budget: the GPU memory the merge allocates never exceeds the budget,
    and the result is the CPU merge's, byte for byte. (By the code's own account about
    24 MiB: tiles of 512 rows, an 8 MiB float32 workspace, the 4 MiB dequantized rows and
    their 4 MiB 16-bit copy, 1 MiB of codes, 1.5 MiB of dequantization workspace.)"""
    side = 4096
    budget = 32 * 2**20
    weight = (torch.randn(side, side, generator=torch.Generator().manual_seed(0)) * 0.02).to(
        torch.bfloat16
    )
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file(quantize_4bit_tensors(NAME, weight, "nf4", True, 64), base / "model.safetensors")
    del weight
    quantization = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": quantization})
    )
    module = NAME.removesuffix(".weight")
    generator = torch.Generator().manual_seed(1)
    lora = {
        f"base_model.model.{module}.lora_A.weight": torch.randn(2, side, generator=generator),
        f"base_model.model.{module}.lora_B.weight": torch.randn(side, 2, generator=generator),
    }
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    options = {"base": base, "adapter": adapter, "max_memory": budget, "quiet": True}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    merge(MergeOptions(out=tmp_path / "cuda", device="cuda", **options))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert 0 < peak <= budget, f"{peak / 2**20:.1f} MiB allocated on the GPU"
    merge(MergeOptions(out=tmp_path / "cpu", device="cpu", **options))
    assert safetensors_bytes(tmp_path / "cuda") == safetensors_bytes(tmp_path / "cpu")
