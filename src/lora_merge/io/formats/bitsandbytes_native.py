"""Write a merged weight 4-bit, as bitsandbytes stores it (``--save-method merged_4bit``).

:class:`FourBitFormat` decides the tensors transformers saves for a
bitsandbytes 4-bit weight (see :mod:`lora_merge.io.formats.bitsandbytes`) and
the quant-state JSON among them, and writes them
(a :class:`~lora_merge.io.formats.protocol.NativeTarget`).

The merged rows arrive in tiles of any size; they are cut into runs of whole
quantization blocks (the remainder waits for the next tile) and quantized with
bitsandbytes' own ``quantize_4bit``. Each block is quantized on its own, so the
codes and scales equal a whole-tensor quantization's, and the packed codes are
written as they come. Only the block scales of the weight (one float32 per
block, 1/16 of a bf16 weight's size) are kept until the end, because double
quantization subtracts their mean over the whole weight before quantizing them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lora_merge.compute.bitsandbytes_backend import (
    quantize_4bit_with_bitsandbytes,
    quantize_absmax_with_bitsandbytes,
)
from lora_merge.compute.dequantize import four_bit_code
from lora_merge.dtypes import F32, U8
from lora_merge.io.shard_writer import ShardWriter, TensorSpec

QUANT_STATE_KEY = "quant_state.bitsandbytes__"
NESTED_BLOCKSIZE = 256  # bitsandbytes' quantize_4bit double-quantizes absmax in blocks of 256
# Longest repr() of a float64 (e.g. -1.2345678901234567e-123): room kept in the
# quant-state JSON for the nested offset, which is known only after quantizing.
MAX_FLOAT_REPR = 24


@dataclass(frozen=True)
class FourBitFormat:
    """How one weight is stored after re-quantization.

    Attributes:
        quant_type: ``nf4`` or ``fp4``.
        blocksize: weights per absmax.
        double_quant: absmax values quantized again (8-bit, blocks of 256).
        dtype: the dtype of the values quantized, recorded in the quant state.
        shape: the weight's logical shape.
    """

    quant_type: str
    blocksize: int
    double_quant: bool
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def quant_state_json(self, nested_offset: float = 0.0) -> bytes:
        """The JSON bitsandbytes packs into ``quant_state.bitsandbytes__*`` (fixed length).

        With double quantization the JSON is padded with spaces (valid JSON
        whitespace) to the length planned before the offset was known.
        """
        state: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if not self.double_quant:
            return json.dumps(state).encode()
        state.update(
            nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=nested_offset
        )
        encoded = json.dumps(state).encode()
        planned = len(json.dumps({**state, "nested_offset": 0.0})) - len("0.0") + MAX_FLOAT_REPR
        return encoded + b" " * (planned - len(encoded))

    def auxiliary_specs(self, name: str) -> list[TensorSpec]:
        """The tensors stored beside the packed codes, in the order they are written."""
        specs = []
        if self.double_quant:
            specs += [
                TensorSpec(f"{name}.absmax", U8, (self.blocks,)),
                TensorSpec(f"{name}.nested_absmax", F32, (-(-self.blocks // NESTED_BLOCKSIZE),)),
                TensorSpec(f"{name}.nested_quant_map", F32, (256,)),
            ]
        else:
            specs.append(TensorSpec(f"{name}.absmax", F32, (self.blocks,)))
        specs.append(TensorSpec(f"{name}.quant_map", F32, (16,)))
        state_bytes = len(self.quant_state_json())
        specs.append(TensorSpec(f"{name}.{QUANT_STATE_KEY}{self.quant_type}", U8, (state_bytes,)))
        return specs

    def stored_specs(self, name: str) -> list[TensorSpec]:
        """The packed codes (under the weight's own name), then :meth:`auxiliary_specs`."""
        packed = TensorSpec(name, U8, ((self.numel + 1) // 2, 1))
        return [packed, *self.auxiliary_specs(name)]

    def held_bytes(self, tile_budget: int) -> int:
        """The weight's block scales (float32, and their 8-bit codes), and a tile joined with
        the remainder of the last."""
        return 2 * 4 * self.blocks + 2 * tile_budget

    def write(
        self,
        tiles: Iterable[torch.Tensor],
        name: str,
        writer: ShardWriter,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Quantize the merged weight ``name`` (row tiles in :attr:`dtype`) into its 4-bit group.

        Writes the packed codes to ``name`` and the scales, codebooks and quant
        state to the group's other tensors in ``writer`` (see :meth:`auxiliary_specs`).
        """
        packed_slot = writer.tensor(name)
        pending = torch.empty(0, dtype=self.dtype)
        scales: list[torch.Tensor] = []
        for tile in tiles:
            values = torch.cat((pending, tile.reshape(-1).to("cpu", self.dtype)))
            whole = values.numel() - values.numel() % self.blocksize
            if whole:
                packed, absmax = quantize_4bit_with_bitsandbytes(
                    values[:whole], self.quant_type, self.blocksize
                )
                on_bytes(packed_slot.write(packed.reshape(-1, 1)))
                scales.append(absmax)
            pending = values[whole:].clone()
        if pending.numel():  # the last, partial block
            packed, absmax = quantize_4bit_with_bitsandbytes(
                pending, self.quant_type, self.blocksize
            )
            on_bytes(packed_slot.write(packed.reshape(-1, 1)))
            scales.append(absmax)
        absmax = torch.cat(scales) if scales else torch.empty(0, dtype=torch.float32)
        for suffix, tensor in self._auxiliary_tensors(absmax).items():
            on_bytes(writer.tensor(f"{name}.{suffix}").write(tensor))

    def _auxiliary_tensors(self, absmax: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors beside the packed codes, by suffix, from the weight's block scales."""
        offset = 0.0
        if self.double_quant:
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
        auxiliary["quant_map"] = four_bit_code(self.quant_type)
        state = self.quant_state_json(offset)
        auxiliary[f"{QUANT_STATE_KEY}{self.quant_type}"] = torch.frombuffer(
            bytearray(state), dtype=torch.uint8
        )
        return auxiliary
