"""Write a merged weight 4-bit, as bitsandbytes stores it (``--save-method merged_4bit``).

The merged rows arrive in tiles of any size; they are cut into runs of whole
quantization blocks (the remainder waits for the next tile) and quantized with
bitsandbytes' own ``quantize_4bit``. Each block is quantized on its own, so the
codes and scales equal a whole-tensor quantization's, and the packed codes are
written as they come. Only the block scales of the weight (one float32 per
block, 1/16 of a bf16 weight's size) are kept until the end, because double
quantization subtracts their mean over the whole weight before quantizing them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lora_merge.compute.bitsandbytes_backend import (
    quantize_4bit_with_bitsandbytes,
    quantize_absmax_with_bitsandbytes,
)
from lora_merge.compute.dequantize import four_bit_code
from lora_merge.io.shard_writer import ShardWriter
from lora_merge.plan.four_bit_format import NESTED_BLOCKSIZE, QUANT_STATE_KEY, FourBitFormat


def write_requantized(
    tiles: Iterable[torch.Tensor],
    target: FourBitFormat,
    name: str,
    writer: ShardWriter,
    on_bytes: Callable[[int], None],
) -> None:
    """Quantize the merged weight ``name`` (row tiles in ``target.dtype``) into its 4-bit group.

    Writes the packed codes to ``name`` and the scales, codebooks and quant
    state to the group's other tensors in ``writer`` (see
    :meth:`FourBitFormat.auxiliary_specs`).
    """
    packed_slot = writer.tensor(name)
    pending = torch.empty(0, dtype=target.dtype)
    scales: list[torch.Tensor] = []
    for tile in tiles:
        values = torch.cat((pending, tile.reshape(-1).to("cpu", target.dtype)))
        whole = values.numel() - values.numel() % target.blocksize
        if whole:
            packed, absmax = quantize_4bit_with_bitsandbytes(
                values[:whole], target.quant_type, target.blocksize
            )
            on_bytes(packed_slot.write(packed.reshape(-1, 1)))
            scales.append(absmax)
        pending = values[whole:].clone()
    if pending.numel():  # the last, partial block
        packed, absmax = quantize_4bit_with_bitsandbytes(
            pending, target.quant_type, target.blocksize
        )
        on_bytes(packed_slot.write(packed.reshape(-1, 1)))
        scales.append(absmax)
    absmax = torch.cat(scales) if scales else torch.empty(0, dtype=torch.float32)

    offset = 0.0
    if target.double_quant:
        codes, nested_absmax, nested_code, offset = quantize_absmax_with_bitsandbytes(
            absmax, NESTED_BLOCKSIZE
        )
        auxiliary = {
            "absmax": codes,
            "nested_absmax": nested_absmax,
            "nested_quant_map": nested_code,
        }
    else:
        auxiliary = {"absmax": absmax}
    auxiliary["quant_map"] = four_bit_code(target.quant_type)
    state = target.quant_state_json(offset)
    auxiliary[f"{QUANT_STATE_KEY}{target.quant_type}"] = torch.frombuffer(
        bytearray(state), dtype=torch.uint8
    )
    for suffix, tensor in auxiliary.items():
        on_bytes(writer.tensor(f"{name}.{suffix}").write(tensor))
