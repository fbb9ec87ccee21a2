"""The safetensors header as bytes: encoded for OUT's shards, read raw from BASE's. Torch-free.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``)
and the data buffer. Encoding needs only names, dtype names, shapes and sizes,
so the copies that start before ``import torch`` (:mod:`lora_merge.run.copy_ahead`)
and the shard writer (:mod:`lora_merge.io.shard_writer`) write the same header with
the same function. Validated parsing, with torch dtypes, is
:mod:`lora_merge.io.safetensors_format`'s.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import NamedTuple

HEADER_LENGTH_BYTES = 8
METADATA_KEY = "__metadata__"
# safetensors pads the JSON header with spaces so that the data buffer starts
# 8-byte aligned; readers that mmap rely on it.
HEADER_ALIGNMENT = 8
OUTPUT_METADATA = {"format": "pt"}


class HeaderTensor(NamedTuple):
    """One tensor as a header lists it: name, safetensors dtype name, shape and data bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def encode_header(tensors: Sequence[HeaderTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and padded JSON header for tensors stored in ``tensors`` order.

    Args:
        tensors: every tensor of the file, in data order.
        metadata: the header's ``__metadata__`` (default: just the format).
    """
    header: dict[str, object] = {METADATA_KEY: dict(metadata or OUTPUT_METADATA)}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded
