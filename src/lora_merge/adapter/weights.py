"""Opening the adapter's weights file without ever running code from it."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from lora_merge.errors import InvalidInputError
from lora_merge.io.reader import InMemoryTensors, SafetensorsReader, TensorSource
from lora_merge.io.safetensors_format import read_safetensors_header


def open_adapter_weights(path: Path) -> TensorSource:
    """A lazy reader for ``adapter_model.safetensors``, or the tensors of ``adapter_model.bin``.

    A ``.bin`` file is a pickle; it is loaded with ``torch.load(weights_only=True)``,
    which refuses anything but tensors and plain containers, so a malicious
    pickle cannot run code.

    Raises:
        InvalidInputError: the file is corrupt, or the pickle holds something else than tensors.
    """
    if path.suffix == ".safetensors":
        header = read_safetensors_header(path)
        return SafetensorsReader({entry.name: entry for entry in header.entries})
    import torch  # a pickle is loaded as tensors; a safetensors adapter is planned without torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise InvalidInputError(
            f"{path} could not be loaded as plain tensors ({str(err).splitlines()[0]}); "
            "lora-merge never runs code from pickles: re-save the adapter with safetensors"
        ) from err
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise InvalidInputError(f"{path} does not hold a mapping of names to tensors")
    return InMemoryTensors(loaded)
