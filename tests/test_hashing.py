"""sha256 of files and byte ranges (io/hashing.py) against hashlib over the bytes read whole."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lora_merge.io.hashing import HASH_WINDOW_BYTES, sha256_of


@pytest.fixture(scope="module")
def three_windows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A file a little over two mapped windows long, with bytes that differ everywhere."""
    data = os.urandom(2 * HASH_WINDOW_BYTES + 12345)
    path = tmp_path_factory.mktemp("hashing") / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("start", "nbytes"),
    [
        (0, None),  # the whole file
        (0, 0),
        (1, 100),  # inside the first window, not at its start
        (65535, HASH_WINDOW_BYTES + 2),  # across a window boundary, unaligned
        (HASH_WINDOW_BYTES, HASH_WINDOW_BYTES),  # exactly the second window
        (2 * HASH_WINDOW_BYTES + 12340, None),  # the last bytes
        (2 * HASH_WINDOW_BYTES + 12340, 10**9),  # a range past the end stops at the end
    ],
)
def test_sha256_of_a_range_is_hashlibs_of_those_bytes(
    three_windows: tuple[Path, bytes], start: int, nbytes: int | None
) -> None:
    path, data = three_windows
    wanted = data[start:] if nbytes is None else data[start : start + nbytes]
    assert sha256_of(path, start, nbytes) == hashlib.sha256(wanted).hexdigest()


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_of(path) == hashlib.sha256(b"").hexdigest()
