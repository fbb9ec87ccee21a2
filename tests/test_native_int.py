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

import pytest
import torch
from integer_checkpoints import (
    awq_float64,
    compressed_tensors_float64,
    gptq_float64,
    pack_awq,
    pack_gptq,
)

from lora_merge.compute.integer_dequantize import (
    dequantize_codes,
    unpack_awq_codes,
    unpack_codes,
    unpack_codes_down_columns,
)

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
