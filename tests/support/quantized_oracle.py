"""bitsandbytes-quantized weights decoded from the checkpoint's own tensors, in float64.

Independent of lora_merge and of bitsandbytes' kernels: only the file is read. A 4-bit
weight ``X.weight`` as transformers saves it consists of

- ``X.weight``: uint8, two 4-bit codes per byte, element ``2k`` in the high nibble, over the
  weight *flattened* in row-major order (the quant state's ``shape`` restores it);
- ``X.weight.quant_map``: the 16-value float32 codebook (NF4 or FP4);
- ``X.weight.absmax``: one scale per block of ``blocksize`` consecutive flattened elements,
  so a block may span several rows, or start in the middle of one;
- with double quantization, the scales are uint8 codes into ``nested_quant_map`` (256 float32
  values), scaled by one float32 ``nested_absmax`` per ``nested_blocksize`` scales, plus the
  float32 ``nested_offset``;
- ``X.weight.quant_state.bitsandbytes__<type>``: the JSON above (shape, blocksize, dtype...).

The format computes ``quant_map[code_i] * absmax[i // blocksize]`` in float32 and rounds it
to ``dtype``. Here every product is formed in float64, where the product of two float32
values is exact (24 + 24 significant bits < 53), then rounded once to float32: that is the
correctly rounded float32 product on any IEEE machine. The nested offset is added in
float64 and rounded to float32, which equals float32 addition (53 >= 2 * 24 + 2 bits, so
the double rounding is innocuous). The result is therefore the format's exact bits,
whatever CPU computes it.

An LLM.int8 weight is ``X.weight`` (int8) and ``X.SCB`` (one float32 scale per row);
bitsandbytes (``int8_vectorwise_dequant``, which transformers uses) computes
``int8 * SCB[row] * 7.874015718698502e-3`` in float32, left to right, the constant being its
float32 for 1/127. Each product is exact in float64 (8 + 24 and 24 + 24 bits) and rounded
once to float32 here, as the two float32 multiplications round.
"""

from __future__ import annotations

import json

import torch

# bitsandbytes' int8_vectorwise_dequant multiplies by this (as float32) instead of dividing by 127.
INT8_SCALE = torch.tensor(7.874015718698502e-3, dtype=torch.float32).double()


def quant_state_of(stored: dict[str, torch.Tensor], name: str) -> dict[str, object]:
    """The JSON quant state stored beside the 4-bit weight ``name``."""
    (key,) = [k for k in stored if k.startswith(f"{name}.quant_state.bitsandbytes__")]
    return json.loads(bytes(stored[key].tolist()))


def block_scales(stored: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The float32 absmax of every block, decoded from its 8-bit codes when double-quantized."""
    absmax = stored[f"{name}.absmax"]
    if absmax.dtype == torch.float32:
        return absmax.reshape(-1)
    state = quant_state_of(stored, name)
    nested_blocksize = int(state["nested_blocksize"])
    codes = stored[f"{name}.nested_quant_map"].double()[absmax.reshape(-1).long()]
    nested_scales = stored[f"{name}.nested_absmax"].double().reshape(-1)
    block = torch.arange(codes.numel()) // nested_blocksize
    scaled = (codes * nested_scales[block]).float().double()
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32).double()
    return (scaled + offset).float()


def decode_4bit(
    stored: dict[str, torch.Tensor], name: str, blocks_follow_rows: bool = False
) -> torch.Tensor:
    """The weight ``name`` at its logical shape and dtype, as the format defines it.

    Args:
        stored: every tensor of the checkpoint.
        name: the weight, e.g. ``model.layers.0.mlp.up_proj.weight``.
        blocks_follow_rows: decode it *wrongly*, with each row starting a new block (as
            a decoder that assumed blocks never cross rows would): only to show that a
            test case can tell the two apart.
    """
    state = quant_state_of(stored, name)
    shape = [int(size) for size in state["shape"]]
    blocksize = int(state["blocksize"])
    dtype = getattr(torch, str(state["dtype"]))
    count = 1
    for size in shape:
        count *= size
    packed = stored[name].reshape(-1).long()
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:count]
    values = stored[f"{name}.quant_map"].double()[codes]
    index = torch.arange(count)
    if blocks_follow_rows:
        width = shape[-1]
        blocks_per_row = -(-width // blocksize)
        block = (index // width) * blocks_per_row + (index % width) // blocksize
    else:
        block = index // blocksize
    scales = block_scales(stored, name).double()
    if int(block.max()) >= scales.numel():  # the wrong reading runs out of scales
        scales = torch.cat([scales, scales.new_zeros(int(block.max()) + 1 - scales.numel())])
    return (values * scales[block]).float().to(dtype).reshape(shape)


def decode_int8(stored: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The LLM.int8 weight ``name`` (``X.weight``, scales in ``X.SCB``), float32."""
    scales = stored[name.removesuffix(".weight") + ".SCB"].double().reshape(-1, 1)
    scaled = (stored[name].double() * scales).float().double()
    return (scaled * INT8_SCALE).float()


def float_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, on the CPU: compared with ``torch.equal`` they tell
    -0.0 from +0.0 (and compare NaNs), which comparing the values does not."""
    views = {2: torch.int16, 4: torch.int32}
    return tensor.detach().cpu().contiguous().view(views[tensor.element_size()])


def assert_bitsandbytes_bits_but_fp4_negative_zeros(
    bitsandbytes_values: torch.Tensor, format_values: torch.Tensor
) -> None:
    """bitsandbytes' kernels give the format's bits, except that they may write FP4's zero
    code (0b1000) as -0.0 where the format's quant_map holds +0.0 (bitsandbytes lists it as
    the Python int ``-0``): its CUDA kernel (``sign * 0.0``) and, measured with 0.50.2, its
    CPU kernel on runs whose length is not a multiple of 64 (element 83 of the same weight
    comes out -0.0 dequantized 180 long and +0.0 192 long). lora-merge follows the format
    (+0.0) whatever the device or the tiling. Equal as numbers; only such zeros differ."""
    theirs, ours = bitsandbytes_values.detach().cpu(), format_values.detach().cpu()
    assert torch.equal(theirs, ours)  # as numbers: -0.0 == +0.0
    differ = float_bits(theirs) != float_bits(ours)
    assert bool((ours[differ] == 0).all()) and bool(torch.signbit(theirs[differ]).all())
    assert not bool(torch.signbit(ours[differ]).any())
