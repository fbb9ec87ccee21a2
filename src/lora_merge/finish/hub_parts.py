"""``--part I/N --push-to-hub REPO --low-disk``: parts that share no file system, only the Hub.

Each part preuploads its own shards (``k % N == I``) to REPO's LFS storage, as
``--low-disk`` does, and commits nothing to the target revision: it commits one
small journal file, ``.lora-merge/parts/part-I-of-N.json`` (the plan's
fingerprint and each shard's name, size, sha256 and first bytes), to a staging
branch named from the fingerprint (``lora-merge-parts-<first 12 hex digits>``,
created from the target revision). A rerun part replaces its own journal file.

The final step (the same command without ``--part``, with ``--resume``) reads
every journal on that branch, asks the Hub's LFS batch API which of those objects
REPO holds, adopts them as already uploaded, computes any shard no part
produced, makes the one commit on the target revision and deletes the branch.

The fingerprint must be the same on every machine: with ``--low-disk`` it names
the inputs by content (file name, size, sha256; a Hub BASE by URL at its commit),
never by a local path or modification time (see :func:`lora_merge.run.shards.resume_fingerprint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lora_merge.errors import InvalidInputError
from lora_merge.io.json_files import read_json_object
from lora_merge.options.values import Part

PARTS_FOLDER = ".lora-merge/parts"
BRANCH_PREFIX = "lora-merge-parts-"


def staging_branch(fingerprint: str) -> str:
    """The branch the parts of the merge with ``fingerprint`` commit their journals to."""
    return f"{BRANCH_PREFIX}{fingerprint[:12]}"


def part_journal_name(part: Part) -> str:
    """Where part ``part`` keeps its journal on the staging branch."""
    return f"{PARTS_FOLDER}/part-{part.index}-of-{part.count}.json"


def commit_part_journal(
    api: HfApi,
    repo_id: str,
    branch: str,
    part: Part,
    fingerprint: str,
    shards: dict[str, dict[str, object]],
) -> str:
    """Commit ``part``'s journal (replacing an earlier one) to ``branch``; return the commit URL.

    Args:
        shards: each uploaded shard's record: ``{"size", "sha256", "sample"}`` by file name.
    """
    journal = {"fingerprint": fingerprint, "part": str(part), "shards": shards}
    content = json.dumps(journal, indent=1, sort_keys=True).encode()
    commit = api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(part_journal_name(part), content)],
        commit_message=f"lora-merge part {part}: {len(shards)} shard(s) uploaded",
        repo_type="model",
        revision=branch,
    )
    return str(commit.commit_url)


def read_part_journals(
    api: HfApi, repo_id: str, branch: str, fingerprint: str
) -> tuple[bool, dict[str, dict[str, Any]], list[str]]:
    """Every shard record of the part journals of ``fingerprint`` on ``branch``.

    Returns:
        Whether the branch exists, the records by shard name, and notes for the
        user (journals of another merge, or damaged, are ignored and counted).
    """
    try:
        entries = list(
            api.list_repo_tree(repo_id, PARTS_FOLDER, revision=branch, repo_type="model")
        )
    except (RevisionNotFoundError, RepositoryNotFoundError):
        return False, {}, []
    except EntryNotFoundError:
        return True, {}, []
    records: dict[str, dict[str, Any]] = {}
    ignored = []
    for entry in entries:
        if not entry.path.endswith(".json"):
            continue
        local = api.hf_hub_download(repo_id, entry.path, revision=branch, repo_type="model")
        try:
            journal = read_json_object(Path(local))
        except InvalidInputError:
            journal = {}
        shards = journal.get("shards")
        if journal.get("fingerprint") != fingerprint or not isinstance(shards, dict):
            ignored.append(entry.path.rsplit("/", 1)[-1])
            continue
        records.update(shards)
    notes = []
    if ignored:
        notes.append(
            f"{len(ignored)} part journal(s) on branch {branch} ({', '.join(ignored)}) belong "
            "to another merge (other options, inputs or lora-merge version) or are damaged: "
            "ignored, their shards computed here"
        )
    return True, records, notes
