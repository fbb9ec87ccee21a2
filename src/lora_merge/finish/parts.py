"""One merge split over several processes or machines: ``--part I/N``, then a final step.

Part I of N writes the output shards whose index k (0-based, in the plan's
order) satisfies ``k % N == I``. Every part writes into one staging area that
each can name without talking to the others: the hidden sibling
``.OUTNAME.lora-merge-parts`` of OUT, on a file system they share. Each part
keeps its own journal file there (``.lora-merge-journal.part-I-of-N.json``:
the plan's fingerprint and each shard's size and sha256), replaced atomically
after every shard, so parts running at the same time never write the same
file. A shard is written under a temporary name and renamed once complete.

The final step (the same command without ``--part``, with ``--resume``) claims
the area by renaming it, keeps the journaled shards of its own plan that still
match their checksum, computes the rest and renames the folder into place.

The area's name has no process id in it, so the clean-up of dead runs' staging
folders (:func:`lora_merge.finish.staging.remove_stale_staging_folders`) never
matches it: it is removed only by the final step that claims it, or by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lora_merge.errors import InvalidInputError, OutputError, UsageError
from lora_merge.io.json_files import read_json_object

PARTS_MARKER = ".lora-merge-parts"
JOURNAL_STEM = ".lora-merge-journal"
_PART_JOURNAL = re.compile(r"\.lora-merge-journal\.part-(\d+)-of-(\d+)\.json")

T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` (``--part index/count``), 0 <= index < count."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, shard_number: int) -> bool:
        """True when the shard at ``shard_number`` (0-based, in plan order) is this part's."""
        return shard_number % self.count == self.index

    def select(self, shards: Sequence[T]) -> list[T]:
        """The shards of the plan this part writes (``k % count == index``), in plan order."""
        return [shard for number, shard in enumerate(shards) if self.owns(number)]

    @property
    def journal_name(self) -> str:
        """This part's own journal file in the shared area."""
        return f"{JOURNAL_STEM}.part-{self.index}-of-{self.count}.json"

    def temporary_name(self, file_name: str) -> str:
        """Where this part writes ``file_name`` until it is complete."""
        return f".{file_name}.part-{self.index}-of-{self.count}.tmp"


def parse_part(text: str | None) -> Part | None:
    """``"1/3"`` -> ``Part(1, 3)``; None stays None.

    Raises:
        UsageError: not two whole numbers ``I/N`` with ``0 <= I < N``.
    """
    if text is None:
        return None
    matched = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if matched is None:
        raise UsageError(
            f"--part {text!r} is not I/N: give this part's number I and the number of "
            "parts N, e.g. --part 0/4 ... --part 3/4"
        )
    index, count = int(matched[1]), int(matched[2])
    if count < 1 or index >= count:
        raise UsageError(
            f"--part {text!r}: the part number must be from 0 to N-1 "
            f"({'0 to ' + str(count - 1) if count else 'N must be at least 1'})"
        )
    return Part(index, count)


def refuse_with_part(
    part: Part | None, writes_adapter: bool, push_to_hub: str | None, low_disk: bool = False
) -> None:
    """``--part`` writes shards of a merged model for the final step to finish: refuse the rest.

    With ``--push-to-hub REPO --low-disk`` a part uploads its shards to REPO's
    staging branch instead (:mod:`lora_merge.finish.hub_parts`).

    Raises:
        UsageError: ``--part`` with ``--save-method lora``, or ``--push-to-hub``
            without ``--low-disk``.
    """
    if part is None:
        return
    if writes_adapter:
        raise UsageError(
            "--part splits a merged model's shards; --save-method lora writes one adapter file"
        )
    if push_to_hub is not None and not low_disk:
        raise UsageError(
            "--part with --push-to-hub needs --low-disk (each part uploads its own shards "
            "to the repo's staging branch); or write the parts into a shared folder and give "
            "--push-to-hub to the final step only (the same command without --part, with --resume)"
        )


def parts_area(staging_prefix: str, out: Path) -> Path:
    """The shared staging area of OUT's parts: ``.OUTNAME.lora-merge-parts`` beside OUT.

    Args:
        staging_prefix: OUT's staging prefix (``.OUTNAME.lora-merge-partial-``,
            with a very long name already shortened); the area swaps its marker.
        out: the final folder.
    """
    name = staging_prefix.removesuffix(".lora-merge-partial-")
    return out.parent / f"{name}{PARTS_MARKER}"


def journal_files(folder: Path) -> list[Path]:
    """Every journal in ``folder``: a resumed run's own and one per part, sorted by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.name.startswith(JOURNAL_STEM) and path.name.endswith(".json")
    )


def part_of_journal(path: Path) -> str:
    """``part 1/3`` for a part's journal, ``the final step`` for a resumed run's own."""
    matched = _PART_JOURNAL.fullmatch(path.name)
    return f"part {matched[1]}/{matched[2]}" if matched else "the final step"


def read_journal(path: Path) -> dict[str, object] | None:
    """A journal's contents, or None when it is missing or damaged (its shards are not kept)."""
    try:
        return read_json_object(path)
    except InvalidInputError:
        return None


def unproduced_note(computed: int | None, total: int) -> list[str]:
    """What a final step says when it computed shards no part produced; nothing otherwise."""
    if not computed:
        return []
    return [
        f"{computed} of {total} shard(s) came from no part (never run, unfinished or damaged): "
        "computed them here"
    ]


def refuse_other_plans(area: Path, fingerprint: str) -> None:
    """Refuse to add a part to an area that holds parts of another merge plan.

    Raises:
        OutputError: a journal in ``area`` records another fingerprint (other
            options, inputs or lora-merge version).
    """
    if not area.is_dir():
        return
    for path in journal_files(area):
        journal = read_journal(path)
        if journal is not None and journal.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{area} holds shards of another merge ({part_of_journal(path)} was run with "
                "other options, inputs or lora-merge version); run every part and the final "
                f"step with the same options, or delete {area.name} to start over"
            )
