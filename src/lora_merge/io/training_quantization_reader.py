"""A base reader whose Linear weights come out as QLoRA training saw them (``--qlora-base``).

Each chosen weight is read whole, quantized and dequantized
(:func:`lora_merge.compute.training_quantization.as_trained`), and kept for the
calling thread until it asks for another weight: the stream reads a weight's
row tiles one after the other, so each thread holds one weight, in its own
dtype, beside bitsandbytes' temporaries. Whole, because double quantization
depends on every block scale of the weight.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import torch

from lora_merge.compute.training_quantization import TrainingQuantization, as_trained
from lora_merge.dtypes import DType
from lora_merge.io.positional import PositionalFile
from lora_merge.io.reader import StoredTensorSource
from lora_merge.io.safetensors_format import TensorEntry


class TrainingQuantizationReader:
    """``stored``'s tensors; those in ``quantized`` as ``dequant(quant(W))``.

    Args:
        stored: the base's reader.
        quantized: weight name -> how QLoRA quantized it.
    """

    def __init__(
        self, stored: StoredTensorSource, quantized: Mapping[str, TrainingQuantization]
    ) -> None:
        self._stored = stored
        self._quantized = dict(quantized)
        self._per_thread = threading.local()

    def close(self) -> None:
        self._stored.close()

    def keys(self) -> Iterable[str]:
        return self._stored.keys()

    def working_bytes(self, key: str) -> int:
        """Nothing beyond the tensor read: the quantization workspace is the stream's."""
        return 0

    def held_bytes(self, workers: int) -> int:
        """Nothing: tensors are read when asked for, a tile at a time."""
        return 0

    def dtype(self, key: str) -> DType:
        return self._stored.dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._stored.shape(key)

    def entry(self, key: str) -> TensorEntry:
        return self._stored.entry(key)

    def prefetch(self, key: str) -> None:
        self._stored.prefetch(key)

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int:
        """Copy a stored tensor's bytes; the planner never copies a weight read quantized."""
        assert key not in self._quantized, f"{key} is read as trained, never copied"
        return self._stored.copy_bytes(key, destination, destination_offset)

    def read_row_bytes(
        self, key: str, start: int, stop: int, first: int, last: int, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """A band of a stored tensor's bytes; a weight read as trained is never read so."""
        assert key not in self._quantized, f"{key} is read as trained, never as bytes"
        return self._stored.read_row_bytes(key, start, stop, first, last, buffer)

    def read_subrows(
        self,
        key: str,
        row: int,
        start: int,
        stop: int,
        buffer: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if key not in self._quantized:
            return self._stored.read_subrows(key, row, start, stop, buffer, compute_dtype)
        return self.read_rows(key, row, row + 1, buffer)[0, start:stop]

    def read_rows(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        quantization = self._quantized.get(key)
        if quantization is None:
            return self._stored.read_rows(key, start, stop, buffer)
        if getattr(self._per_thread, "key", None) != key:
            self._per_thread.weight = None  # let the last one go before making the next
            self._per_thread.weight = as_trained(self._stored.read_rows(key), quantization)
            self._per_thread.key = key
        weight: torch.Tensor = self._per_thread.weight
        return weight[start:stop]
