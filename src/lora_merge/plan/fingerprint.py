"""A digest of everything that decides a merge's output bytes, for resuming safely.

Two runs with the same fingerprint write the same shards, so a resumed run may
keep the shards an interrupted one finished. It covers the plan (every output
tensor, its source and delta, its shard), the identity of every input file
(size and modification time, cheap to read) and the lora-merge version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from lora_merge.io.hashing import sha256_of
from lora_merge.plan.model import PlannedTensor


def merge_fingerprint(
    shards: Sequence[tuple[str, Sequence[PlannedTensor]]],
    input_files: Iterable[Path],
    version: str,
    recipe: str = "",
    by_content: bool = False,
) -> str:
    """sha256 over the shard plan, the input files' sizes and mtimes, the version, and
    how several adapters were combined (``recipe``: weights, method, seed...).

    With ``by_content`` the input files count by name, size and sha256 (read in
    full) instead: the same on every machine, wherever the files are.
    """
    inputs = sorted(
        (path.name, path.stat().st_size, sha256_of(path))
        if by_content
        else (str(path), path.stat().st_size, path.stat().st_mtime_ns)
        for path in set(input_files)
    )
    description: dict[str, object] = {
        "version": version,
        "inputs": inputs,
        "shards": [
            [file_name, [_describe(tensor) for tensor in tensors]] for file_name, tensors in shards
        ],
    }
    if recipe:
        description["recipe"] = recipe
    encoded = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def _describe(tensor: PlannedTensor) -> dict[str, object]:
    return {
        "name": tensor.spec.name,
        "dtype": str(tensor.spec.dtype),
        "shape": list(tensor.spec.shape),
        "source": tensor.source,
        "source_key": tensor.source_key,
        "source_dtype": str(tensor.source_dtype),
        "delta": None
        if tensor.delta is None
        else [type(tensor.delta).__name__, asdict(tensor.delta)],
        "token_rows": None if tensor.token_rows is None else asdict(tensor.token_rows),
    }
