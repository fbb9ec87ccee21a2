"""The in-order hasher gives hashlib's digest of the file, whatever order and threads feed it.

Oracle: ``hashlib.sha256`` over the file's bytes, read independently.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_merge.errors import InvalidInputError
from lora_merge.io.hashing import InOrderHasher


def _ranges(size: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, size, *(c % (size + 1) for c in cuts)})
    return list(itertools.pairwise(points))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=300_000),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=30),
    window=st.sampled_from([0, 4096, 100_000, 10**7]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_feeding_gives_the_files_sha256(
    tmp_path_factory: pytest.TempPathFactory, size: int, cuts: list[int], window: int, seed: int
) -> None:
    """Ranges fed in order, shuffled, overlapping, some never (left for the file), from two
    threads at once: the digest is hashlib's over the file."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    path = tmp_path_factory.mktemp("hash") / "file.bin"
    path.write_bytes(data)
    ranges = [r for r in _ranges(size, cuts) if rng.random() < 0.85]
    ranges += [(a, min(size, b + 100)) for a, b in ranges if rng.random() < 0.1]  # overlaps
    if rng.random() < 0.5:
        rng.shuffle(ranges)
    hasher = InOrderHasher(path, window_bytes=window)

    def feed(part: list[tuple[int, int]]) -> None:
        for start, stop in part:
            hasher.feed(start, memoryview(bytearray(data[start:stop])))  # a reused-looking buffer
            if rng.random() < 0.2:
                hasher.fill_to(start, wait=False)

    threads = [threading.Thread(target=feed, args=(ranges[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert hasher.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hasher.bytes_from_memory + hasher.bytes_from_file == size


def test_in_order_ranges_are_hashed_from_memory_not_read_again(tmp_path: Path) -> None:
    """Fed front to back (as the stream reads), only the bytes nobody fed are read from the file."""
    data = os.urandom(1_000_000)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    hasher = InOrderHasher(path)
    header = 1000  # never fed, as a safetensors header
    for start in range(header, len(data), 65536):
        hasher.feed(start, memoryview(data)[start : start + 65536])
        hasher.fill_to(start)  # what the stream does once no task is before ``start``
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hasher.bytes_from_file == header


def test_a_buffer_reused_after_feeding_does_not_change_the_digest(tmp_path: Path) -> None:
    """An early range is copied: overwriting the caller's buffer afterwards changes nothing."""
    data = os.urandom(200_000)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    hasher = InOrderHasher(path)
    early = bytearray(data[100_000:])
    hasher.feed(100_000, memoryview(early))
    early[:] = bytes(len(early))  # the stream reuses its tile buffer
    hasher.feed(0, memoryview(data)[:100_000])
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hasher.bytes_from_file == 0


def test_a_file_that_shrinks_before_it_is_hashed_is_an_input_error(tmp_path: Path) -> None:
    """Bytes the hasher must read itself but that are gone: the user-facing input error."""
    path = tmp_path / "file.bin"
    path.write_bytes(os.urandom(100_000))
    hasher = InOrderHasher(path)
    os.truncate(path, 50_000)
    with pytest.raises(InvalidInputError, match="truncated or changed"):
        hasher.hexdigest()
