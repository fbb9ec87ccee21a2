"""The safetensors file format: header parsing with every check. Torch-free.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``)
and the data buffer. Offsets are relative to the buffer. We parse headers
ourselves (rather than through ``safe_open``) because we need the offsets: the
reader does bounded ``pread`` calls and copies untouched tensors byte for byte.
Files come from the internet, so nothing in a header is trusted.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_merge.dtypes import DTYPE_BY_SAFETENSORS_NAME, DType
from lora_merge.errors import InvalidInputError
from lora_merge.io.hub_names import SAFETENSORS_MAX_HEADER_LENGTH
from lora_merge.io.json_files import is_count
from lora_merge.io.safetensors_header import HEADER_LENGTH_BYTES, METADATA_KEY

# Torch computes element counts and strides in int64: a shape whose dimensions
# (zeros counted as ones) multiply past this cannot be a torch tensor, even empty.
MAX_ELEMENTS = 2**63 - 1

# Values quoted in error messages are shortened: a header may hold megabytes of them.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in one safetensors file.

    Attributes:
        name: the tensor's key.
        path: the file.
        dtype: its dtype.
        shape: its shape.
        start: absolute byte offset of its data in the file.
        nbytes: size of its data.
    """

    name: str
    path: Path
    dtype: DType
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (one index of the first dimension); the whole tensor for scalars."""
        if not self.shape or self.shape[0] == 0:
            return self.nbytes
        return self.nbytes // self.shape[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: its tensors (in data order) and metadata."""

    path: Path
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Checks: the length prefix fits the file and the format's limit, the JSON is
    an object, every dtype is known, shapes are non-negative integers, each
    tensor's byte range matches its shape and lies inside the file, and ranges
    do not overlap.

    Raises:
        InvalidInputError: the file is truncated or its header is corrupt.
    """
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size

            def read_at(offset: int, nbytes: int) -> bytes:
                handle.seek(offset)
                return handle.read(nbytes)

            return parse_safetensors_header(path, file_size, read_at)
    except OSError as err:
        raise InvalidInputError(f"cannot read {path}: {err.strerror or err}") from err


def parse_safetensors_header(
    path: Path, file_size: int, read_at: Callable[[int, int], bytes]
) -> SafetensorsHeader:
    """Validate the header of a safetensors file of ``file_size`` bytes, read with ``read_at``.

    ``read_at(offset, nbytes)`` returns up to ``nbytes`` bytes from ``offset``: from a
    local file, or from ranged HTTP requests to a file on the Hub (``path`` then
    names the file in messages). The checks are those of :func:`read_safetensors_header`.

    Raises:
        InvalidInputError: the file is truncated or its header is corrupt.
    """
    prefix = read_at(0, HEADER_LENGTH_BYTES) if file_size >= HEADER_LENGTH_BYTES else b""
    if len(prefix) < HEADER_LENGTH_BYTES:
        raise _corrupt(path, "it is shorter than the 8-byte header length")
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > SAFETENSORS_MAX_HEADER_LENGTH:
        raise _corrupt(path, f"its header length {header_length} is implausibly large")
    if HEADER_LENGTH_BYTES + header_length > file_size:
        raise _corrupt(path, "its header runs past the end of the file (truncated?)")
    raw_header = read_at(HEADER_LENGTH_BYTES, header_length)
    header = _decode_header(path, raw_header)
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")

    metadata = header.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "its __metadata__ is not a map of strings")

    data_start = HEADER_LENGTH_BYTES + header_length
    data_size = file_size - data_start
    entries = [
        _parse_entry(path, name, info, data_start, data_size) for name, info in header.items()
    ]
    # By (start, size), as the safetensors library sorts: an empty tensor at the offset
    # where the next one starts is not an overlap, whatever order the JSON lists them in.
    entries.sort(key=lambda entry: (entry.start, entry.nbytes))
    for previous, current in itertools.pairwise(entries):
        if current.start < previous.start + previous.nbytes:
            raise _corrupt(
                path,
                f"tensors {_SHORT.repr(previous.name)} and {_SHORT.repr(current.name)} overlap",
            )
    return SafetensorsHeader(path=path, entries=tuple(entries), metadata=metadata)


class _DuplicateKeyError(ValueError):
    """A JSON object of the header names one key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NotUnicodeError(ValueError):
    """A string of the header holds a lone surrogate escape such as ``\\ud800``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _decode_header(path: Path, raw_header: bytes) -> object:
    """The header's JSON value: strict UTF-8, no repeated keys, no lone surrogates.

    ``json.loads`` alone would guess UTF-16/32 encodings, keep the last of two
    equal keys (so the first escapes every check), accept ``"\\ud800"`` escapes
    that the safetensors library refuses, and raise ``ValueError`` (integers of
    more than 4300 digits) or ``RecursionError`` (deep nesting) besides
    ``JSONDecodeError``.
    """
    try:
        return json.loads(raw_header.decode("utf-8"), object_pairs_hook=_checked_object)
    except UnicodeDecodeError as err:
        raise _corrupt(path, f"its header is not UTF-8 ({err})") from err
    except _DuplicateKeyError as err:
        raise _corrupt(path, f"its header names {_SHORT.repr(err.key)} twice") from err
    except _NotUnicodeError as err:
        raise _corrupt(
            path, f"its header holds {_SHORT.repr(err.text)}, which is not valid Unicode"
        ) from err
    except RecursionError as err:
        raise _corrupt(path, "its header is not valid JSON (nested too deeply)") from err
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise _corrupt(path, f"its header is not valid JSON ({_SHORT.repr(str(err))})") from err


def _checked_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        for text in (key, value):
            if isinstance(text, str) and not _is_unicode(text):
                raise _NotUnicodeError(text)
        result[key] = value
    return result


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_entry(
    path: Path, name: str, info: object, data_start: int, data_size: int
) -> TensorEntry:
    if not isinstance(info, dict):
        raise _corrupt(path, f"the entry for {name!r} is not an object")
    dtype_name = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    quoted = _SHORT.repr(name)
    if not isinstance(dtype_name, str) or dtype_name not in DTYPE_BY_SAFETENSORS_NAME:
        raise _corrupt(path, f"tensor {quoted} has unknown dtype {_SHORT.repr(dtype_name)}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {quoted} has an invalid shape {_SHORT.repr(shape)}")
    if not _fits_torch(shape):
        raise _corrupt(
            path,
            f"tensor {quoted} has shape {_SHORT.repr(shape)}, too large for any tensor "
            f"(its dimensions multiply past {MAX_ELEMENTS})",
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, f"tensor {quoted} has invalid data_offsets {_SHORT.repr(offsets)}")
    dtype = DTYPE_BY_SAFETENSORS_NAME[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    begin, end = offsets
    if end - begin != expected:
        raise _corrupt(
            path, f"tensor {quoted} spans {end - begin} bytes but its shape needs {expected}"
        )
    if end > data_size:
        raise _corrupt(path, f"tensor {quoted} runs past the end of the file (truncated?)")
    return TensorEntry(
        name=name,
        path=path,
        dtype=dtype,
        shape=tuple(shape),
        start=data_start + begin,
        nbytes=expected,
    )


def _fits_torch(shape: list[int]) -> bool:
    """Whether the dimensions, zeros counted as ones, multiply to at most ``MAX_ELEMENTS``.

    Stops at the first partial product past the limit, so a header of thousands
    of 4000-digit dimensions costs microseconds, not hours of big-int products.
    """
    product = 1
    for dimension in shape:
        product *= max(dimension, 1)
        if product > MAX_ELEMENTS:
            return False
    return True


def _corrupt(path: Path, reason: str) -> InvalidInputError:
    return InvalidInputError(
        f"{path} is not a valid safetensors file: {reason}; re-download or re-save it"
    )
