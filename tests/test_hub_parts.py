"""``--part I/N --push-to-hub REPO --low-disk``: parts that share only the Hub, then a final step.

Each part runs as another machine would: its own OUT folder and its own
huggingface_hub cache (HF_HOME), so nothing but the Hub (``fake_hub``, which
huggingface_hub's real client talks to) carries the parts' work to the final
step. The oracle is a single ``--low-disk`` run of the same inputs to another
repo: every file on the target branch must be byte-identical to it, except the
model card's recorded command line; and the fake Hub's own record of the LFS
uploads, branches and commits.
"""

from __future__ import annotations

import difflib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, start_fake_hub
from handmade_checkpoints import write_adapter, write_base
from hub_runs import ADAPTER_REPO, BASE_REPO, SHARD_SIZE, TARGET, push_env, run_cli

from lora_merge.errors import EXIT_PUSH_FAILED, EXIT_USAGE

SINGLE = "me/single-run"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A fake Hub serving a 3-shard base (with a tokenizer file) and its adapter."""
    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    write_base(base, shards=3)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    write_adapter(adapter, base_model_name_or_path=BASE_REPO)
    server, fake = start_fake_hub()
    fake.serve_folder(BASE_REPO, base)
    fake.serve_folder(ADAPTER_REPO, adapter)
    yield fake
    server.shutdown()


def hub_run(
    hub: FakeHub, machine: Path, target: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """A ``--low-disk`` run to ``target`` on a "machine" with its own OUT and cache."""
    return run_cli(
        BASE_REPO,
        ADAPTER_REPO,
        machine / "out",
        "--push-to-hub",
        target,
        "--low-disk",
        "--max-shard-size",
        SHARD_SIZE,
        "--json",
        "-q",
        *extra,
        env=push_env(hub, machine / "home"),
    )


def card_changes(expected: bytes, received: bytes) -> list[str]:
    """The lines of the model card that differ (``-`` expected, ``+`` received)."""
    diff = difflib.unified_diff(
        expected.decode().splitlines(), received.decode().splitlines(), lineterm="", n=0
    )
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def lfs_uploads(hub: FakeHub) -> int:
    return sum(1 for request in hub.requests if request.startswith("PUT /lfs-upload/"))


def single_run(hub: FakeHub, tmp_path: Path) -> dict[str, bytes]:
    """The oracle: one ``--low-disk`` run of the same merge, to another repo."""
    result = hub_run(hub, tmp_path / "single", SINGLE)
    assert result.returncode == 0, result.stderr
    return dict(hub.repos[SINGLE].branches["main"])


def staging_branches(hub: FakeHub) -> list[str]:
    return [name for name in hub.repos[TARGET].branches if name.startswith("lora-merge-parts-")]


def assert_same_as_single_run(hub: FakeHub, expected: dict[str, bytes]) -> None:
    received = hub.repos[TARGET].branches["main"]
    assert sorted(received) == sorted(expected)
    for name in sorted(expected):
        if name != "README.md":
            assert received[name] == expected[name], name
    assert card_changes(expected["README.md"], received["README.md"]) == [
        f"-lora-merge {BASE_REPO} {ADAPTER_REPO} OUT --push-to-hub {SINGLE} --low-disk "
        f"--max-shard-size {SHARD_SIZE} --json -q",
        f"+lora-merge {BASE_REPO} {ADAPTER_REPO} OUT --push-to-hub {TARGET} --low-disk "
        f"--max-shard-size {SHARD_SIZE} --json -q --resume",
    ]


def test_two_parts_hub_to_hub_then_the_final_step(hub: FakeHub, tmp_path: Path) -> None:
    """Two parts upload their shards and commit only journals to a staging branch; the final
    step uploads no shard again, makes one commit on main and deletes the branch."""
    expected = single_run(hub, tmp_path)
    shards = sorted(name for name in expected if name.endswith(".safetensors"))
    assert len(shards) == 4
    uploads_before = lfs_uploads(hub)

    for index in (0, 1):
        result = hub_run(hub, tmp_path / f"machine-{index}", TARGET, "--part", f"{index}/2")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["part"] == f"{index}/2"
        assert summary["files"] == shards[index::2]
        assert sorted(path.name for path in (tmp_path / f"machine-{index}").iterdir()) == [
            "home"  # nothing left beside OUT: no shard, no journal, no parts area
        ]
    # The parts changed nothing on main; each committed its journal to one staging branch.
    repo = hub.repos[TARGET]
    assert repo.branches["main"] == {}
    assert "main" not in repo.branch_commits
    [branch] = staging_branches(hub)
    journals = sorted(name for name in repo.branches[branch] if name.startswith(".lora-merge/"))
    assert journals == [".lora-merge/parts/part-0-of-2.json", ".lora-merge/parts/part-1-of-2.json"]
    recorded = json.loads(repo.branches[branch][".lora-merge/parts/part-1-of-2.json"])
    assert sorted(recorded["shards"]) == shards[1::2]
    assert lfs_uploads(hub) - uploads_before == 4  # the repos hold no object in common

    result = hub_run(hub, tmp_path / "machine-final", TARGET, "--resume")

    assert result.returncode == 0, result.stderr
    assert lfs_uploads(hub) - uploads_before == 4  # the final step uploaded no shard
    assert_same_as_single_run(hub, expected)
    assert staging_branches(hub) == [] and repo.deleted_branches == [branch]
    assert len(repo.branch_commits["main"]) == 1
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == 4 and summary["computed_shards"] == 0


def test_a_part_never_run_is_computed_by_the_final_step(hub: FakeHub, tmp_path: Path) -> None:
    """Only part 1/2 ran: the final step computes part 0's two shards and says so."""
    expected = single_run(hub, tmp_path)
    result = hub_run(hub, tmp_path / "machine-1", TARGET, "--part", "1/2")
    assert result.returncode == 0, result.stderr

    result = hub_run(hub, tmp_path / "machine-final", TARGET, "--resume")

    assert result.returncode == 0, result.stderr
    assert_same_as_single_run(hub, expected)
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == 2 and summary["computed_shards"] == 2
    assert "2 of 4 shard(s) came from no part" in result.stderr
    assert staging_branches(hub) == []
    assert len(hub.repos[TARGET].branch_commits["main"]) == 1


def test_a_journal_of_another_merge_on_the_branch_is_ignored_with_a_warning(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A part journal whose fingerprint is not the final step's: one warning, its shards
    computed again."""
    expected = single_run(hub, tmp_path)
    result = hub_run(hub, tmp_path / "machine-0", TARGET, "--part", "0/2")
    assert result.returncode == 0, result.stderr
    [branch] = staging_branches(hub)
    files = hub.repos[TARGET].branches[branch]
    journal = json.loads(files[".lora-merge/parts/part-0-of-2.json"])
    journal["fingerprint"] = "0" * 64
    files[".lora-merge/parts/part-0-of-2.json"] = json.dumps(journal).encode()

    result = hub_run(hub, tmp_path / "machine-final", TARGET, "--resume")

    assert result.returncode == 0, result.stderr
    assert_same_as_single_run(hub, expected)
    assert "1 part journal(s) on branch" in result.stderr
    assert "part-0-of-2.json" in result.stderr
    assert json.loads(result.stdout)["computed_shards"] == 4


def test_a_failed_final_commit_keeps_the_branch_for_a_rerun(hub: FakeHub, tmp_path: Path) -> None:
    """The final step's commit refused: nothing on main, the staging branch stays; the rerun
    adopts the parts' shards again (no upload) and finishes."""
    expected = single_run(hub, tmp_path)
    for index in (0, 1):
        result = hub_run(hub, tmp_path / f"machine-{index}", TARGET, "--part", f"{index}/2")
        assert result.returncode == 0, result.stderr
    [branch] = staging_branches(hub)
    uploads_before = lfs_uploads(hub)
    hub.refuse_commits_with = 500

    result = hub_run(hub, tmp_path / "machine-final", TARGET, "--resume")

    assert result.returncode == EXIT_PUSH_FAILED
    assert hub.repos[TARGET].branches["main"] == {} and staging_branches(hub) == [branch]
    hub.refuse_commits_with = None
    result = hub_run(hub, tmp_path / "machine-final", TARGET, "--resume")
    assert result.returncode == 0, result.stderr
    assert lfs_uploads(hub) == uploads_before
    assert_same_as_single_run(hub, expected)
    assert staging_branches(hub) == []


def test_part_with_push_to_hub_without_low_disk_is_one_usage_line(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--part", "0/2",
        "--push-to-hub", TARGET,
    )  # fmt: skip
    assert result.returncode == EXIT_USAGE
    assert "--part with --push-to-hub needs --low-disk" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
