"""The storage format of one weight written 4-bit (``--save-method merged_4bit``).

It decides the tensors transformers saves for a bitsandbytes 4-bit weight
(see :mod:`lora_merge.inputs.quantized`) and the quant-state JSON among them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from lora_merge.io.shard_writer import TensorSpec

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
                TensorSpec(f"{name}.absmax", torch.uint8, (self.blocks,)),
                TensorSpec(
                    f"{name}.nested_absmax", torch.float32, (-(-self.blocks // NESTED_BLOCKSIZE),)
                ),
                TensorSpec(f"{name}.nested_quant_map", torch.float32, (256,)),
            ]
        else:
            specs.append(TensorSpec(f"{name}.absmax", torch.float32, (self.blocks,)))
        specs.append(TensorSpec(f"{name}.quant_map", torch.float32, (16,)))
        state_bytes = len(self.quant_state_json())
        specs.append(
            TensorSpec(f"{name}.{QUANT_STATE_KEY}{self.quant_type}", torch.uint8, (state_bytes,))
        )
        return specs
