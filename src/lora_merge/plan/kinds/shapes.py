"""What every layer kind's shape rule starts from: a module's A and B shapes, and its weight's.

A LoRA module is a pair of factors, A (r, in) and B (out, r), possibly with
kernel dimensions (convolutions), and the base weight it names. Each kind in
:mod:`lora_merge.plan.kinds` decides from these shapes whether the pair fits the
weight and how the product is laid out; the checks every kind shares are here.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_merge.adapter.keys import LoraModuleKeys
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.plan.model import LoraProduct
from lora_merge.plan.names import shape_mismatch


@dataclass(frozen=True)
class LoraShapes:
    """One LoRA module's factor shapes and the base weight it targets.

    Attributes:
        module: the module's adapter keys (A and B are both present).
        a_shape / b_shape: shapes of A and B as stored in the adapter.
        weight_key / weight_shape: the base weight (or the adapter tensor replacing it).
    """

    module: LoraModuleKeys
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    weight_key: str
    weight_shape: tuple[int, ...]

    @property
    def a_key(self) -> str:
        """The adapter key of A."""
        assert self.module.a_key is not None
        return self.module.a_key

    @property
    def b_key(self) -> str:
        """The adapter key of B."""
        assert self.module.b_key is not None
        return self.module.b_key

    def mismatch(self) -> AdapterMismatchError:
        """The error for factors that do not fit the weight."""
        return shape_mismatch(self.a_key, self.a_shape, self.weight_key, self.weight_shape)

    def check_factors(self) -> None:
        """A and B have as many dimensions as each other, two or more.

        Raises:
            InvalidInputError: they do not (a LoRA layer kind lora-merge does not know).
        """
        if len(self.a_shape) != len(self.b_shape) or len(self.a_shape) < 2:
            raise InvalidInputError(
                f"adapter module {self.module.module!r} has LoRA matrices of shapes "
                f"{self.a_shape} and {self.b_shape}; only Linear, Conv1D, Embedding and "
                "convolution LoRA layers are supported"
            )

    def checked_rank(self) -> int:
        """r, the rows of A, once B's columns agree.

        Raises:
            AdapterMismatchError: B's columns are not A's rows.
        """
        rank = self.a_shape[0]
        if self.b_shape[1] != rank:
            raise AdapterMismatchError(
                f"adapter module {self.module.module!r}: A is {self.a_shape} but B is "
                f"{self.b_shape}; their ranks differ, so the adapter file is inconsistent"
            )
        return rank

    def product(self, scale: float, transposed: bool, layer: str) -> LoraProduct:
        """The planned ``scale * B @ A`` of this module (whole-delta modules stay whole)."""
        return LoraProduct(
            a_key=self.a_key,
            b_key=self.b_key,
            scale=scale,
            transposed=transposed,
            layer=layer,
            dense=self.module.dense,
        )
