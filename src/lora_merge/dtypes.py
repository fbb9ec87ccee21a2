"""Tensor element types as the plan knows them, without torch. Torch-free.

A plan is made from JSON and safetensors headers alone (names, dtype names,
shapes), so it can be made before ``import torch`` (which takes over a second):
its dtypes are :class:`DType` values, named as safetensors names them. Only
where tensor values are made or read does a dtype become a ``torch.dtype``, in
one place: :attr:`DType.torch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One element type.

    Attributes:
        name: the safetensors dtype name (``"BF16"``), as headers store it.
        torch_name: the name of the same dtype in torch (``"bfloat16"``).
        itemsize: bytes per element.
        is_floating_point: whether it holds floating-point values, as torch's
            ``dtype.is_floating_point`` says.
    """

    name: str
    torch_name: str
    itemsize: int
    is_floating_point: bool

    def __str__(self) -> str:
        # As torch prints its dtypes: messages, reports and plan fingerprints read as before.
        return f"torch.{self.torch_name}"

    @property
    def torch(self) -> torch.dtype:
        """The same dtype in torch, for the code that makes or reads tensor values."""
        import torch

        dtype: torch.dtype = getattr(torch, self.torch_name)
        return dtype


F64 = DType("F64", "float64", 8, True)
F32 = DType("F32", "float32", 4, True)
F16 = DType("F16", "float16", 2, True)
BF16 = DType("BF16", "bfloat16", 2, True)
F8_E4M3 = DType("F8_E4M3", "float8_e4m3fn", 1, True)
F8_E5M2 = DType("F8_E5M2", "float8_e5m2", 1, True)
I64 = DType("I64", "int64", 8, False)
I32 = DType("I32", "int32", 4, False)
I16 = DType("I16", "int16", 2, False)
I8 = DType("I8", "int8", 1, False)
U64 = DType("U64", "uint64", 8, False)
U32 = DType("U32", "uint32", 4, False)
U16 = DType("U16", "uint16", 2, False)
U8 = DType("U8", "uint8", 1, False)
BOOL = DType("BOOL", "bool", 1, False)

# The safetensors dtypes that lora-merge reads: those torch can hold.
DTYPE_BY_SAFETENSORS_NAME = {
    dtype.name: dtype
    for dtype in (F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL)
}
DTYPE_BY_TORCH_NAME = {dtype.torch_name: dtype for dtype in DTYPE_BY_SAFETENSORS_NAME.values()}


def dtype_of(torch_dtype: torch.dtype) -> DType:
    """The :class:`DType` of a torch dtype (a tensor held in memory, an option's value).

    Raises:
        KeyError: a dtype safetensors cannot store (complex numbers, quantized integers).
    """
    return DTYPE_BY_TORCH_NAME[str(torch_dtype).removeprefix("torch.")]
