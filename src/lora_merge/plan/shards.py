"""Grouping output tensors into shard files. Torch-free: it only sees sizes."""

from __future__ import annotations

from collections.abc import Sequence

from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE


def plan_output_shards(sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Split tensors, kept in order, into shards of at most ``max_shard_size`` bytes.

    Greedy, like huggingface_hub's ``split_torch_state_dict_into_shards``: a shard
    is closed when the next tensor would not fit; a tensor larger than the limit
    gets a shard of its own. Sizes count tensor data only, not headers.

    Args:
        sizes: ``(name, nbytes)`` in the order the tensors will be written.
        max_shard_size: the limit in bytes (> 0).

    Returns:
        The tensor names of each shard, in order. At least one (possibly empty) shard.
    """
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, nbytes in sizes:
        if shards[-1] and shard_bytes + nbytes > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000N.safetensors``."""
    if count == 1:
        return [SAFETENSORS_SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
