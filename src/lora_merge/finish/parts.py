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
from pathlib import Path

from lora_merge.errors import InvalidInputError, OutputError
from lora_merge.io.json_files import read_json_object
from lora_merge.options.values import Part

PARTS_MARKER = ".lora-merge-parts"
JOURNAL_STEM = ".lora-merge-journal"
_PART_JOURNAL = re.compile(r"\.lora-merge-journal\.part-(\d+)-of-(\d+)\.json")


def journal_name_of(part: Part) -> str:
    """A part's own journal file in the shared area."""
    return f"{JOURNAL_STEM}.part-{part.index}-of-{part.count}.json"


def temporary_name_of(part: Part, file_name: str) -> str:
    """Where a part writes ``file_name`` until it is complete."""
    return f".{file_name}.part-{part.index}-of-{part.count}.tmp"


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
