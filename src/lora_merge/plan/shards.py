"""Grouping output tensors into shard files. Torch-free: it only sees names and sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from lora_merge.io.hub_names import SAFETENSORS_SINGLE_FILE
from lora_merge.options.values import Part


class _Spec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def nbytes(self) -> int: ...


class ShardedTensor(Protocol):
    """What the layout reads of a planned tensor (``PlannedTensor`` is one)."""

    @property
    def spec(self) -> _Spec: ...

    @property
    def written_with(self) -> str | None: ...


T = TypeVar("T", bound=ShardedTensor)
Shard = TypeVar("Shard")


def shard_layout(tensors: Sequence[T], max_shard_size: int) -> list[tuple[str, list[T]]]:
    """Output file names and the planned tensors of each, in write order.

    A tensor whose ``written_with`` names another (a 4-bit weight's scales and
    quant state) goes in that one's shard: they are written together.

    Args:
        tensors: the planned tensors, in plan order.
        max_shard_size: the limit in bytes (see :func:`plan_output_shards`).
    """
    group: dict[str, list[T]] = {}
    for tensor in tensors:
        group.setdefault(tensor.written_with or tensor.spec.name, []).append(tensor)
    names_per_shard = plan_output_shards(
        [(name, sum(t.spec.nbytes for t in members)) for name, members in group.items()],
        max_shard_size,
    )
    file_names = shard_file_names(len(names_per_shard))
    return [
        (file_name, [member for name in names for member in group[name]])
        for file_name, names in zip(file_names, names_per_shard, strict=True)
    ]


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


def shards_of_part(part: Part, shards: Sequence[Shard]) -> list[Shard]:
    """The shards of the plan that ``--part I/N`` writes (shard ``k`` when ``k % N == I``),
    in plan order."""
    return [shard for number, shard in enumerate(shards) if number % part.count == part.index]


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000N.safetensors``."""
    if count == 1:
        return [SAFETENSORS_SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
