"""sha256 of files and byte ranges, read in bounded chunks."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_CHUNK_BYTES = 8 * 2**20


def sha256_of(path: Path, start: int = 0, nbytes: int | None = None) -> str:
    """Hex sha256 of ``nbytes`` bytes of ``path`` from ``start`` (to the end by default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = nbytes
        while remaining is None or remaining > 0:
            chunk = handle.read(
                HASH_CHUNK_BYTES if remaining is None else min(HASH_CHUNK_BYTES, remaining)
            )
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()
