"""One merge split into parts (``--part I/N``) and finished by the same command with ``--resume``.

Each test runs the installed command in subprocesses, as a job array would,
and compares the finished OUT file by file (sha256 with hashlib) with one
uninterrupted run of the final command on one machine: the parts' OUT must be
byte-identical, whatever the number of parts, parts killed and rerun, or never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from handmade_checkpoints import write_big_base_and_adapter
from merge_process import (
    FIRST_JOURNALED_SHARD,
    FIRST_TENSOR_WRITE,
    LORA_MERGE,
    needs_sigstop,
    start_merge_stopped_at,
)

from lora_merge import MergeOptions, UsageError, merge
from lora_merge.finish.staging import remove_stale_staging_folders
from lora_merge.options import checked_options

EXIT_USAGE = 2
EXIT_OUTPUT_REFUSED = 6
# 12 tensors of 128 KiB in bfloat16, two per 300 kB shard: 6 shards, split 6/3/2 ways.
SHARDS = 6
OPTIONS = ("--dtype", "bf16", "--max-shard-size", "300kB", "--max-memory", "2MB")
FINAL = (*OPTIONS, "--resume", "--json", "-q")


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, timeout=300
    )


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def parts_area(out: Path) -> Path:
    return out.parent / f".{out.name}.lora-merge-parts"


def run_part(base: Path, adapter: Path, out: Path, part: str, *extra: str) -> dict[str, object]:
    result = run_cli(base, adapter, out, *OPTIONS, "--part", part, "--json", "-q", *extra)
    assert result.returncode == 0, result.stderr
    assert not out.exists(), "a part must leave OUT to the final step"
    return json.loads(result.stdout)


def finish(base: Path, adapter: Path, out: Path) -> tuple[dict[str, object], str]:
    result = run_cli(base, adapter, out, *FINAL)
    assert result.returncode == 0, result.stderr
    assert not parts_area(out).exists(), "the final step takes the parts' area over"
    return json.loads(result.stdout), result.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_big_base_and_adapter(tmp_path_factory.mktemp("parts"), tensors=12, side=256)


@pytest.fixture(scope="module")
def one_run(inputs, tmp_path_factory) -> dict[str, str]:
    """The files of the final command run alone on one machine, by sha256."""
    base, adapter = inputs
    reference = tmp_path_factory.mktemp("one-run") / "merged"
    result = run_cli(base, adapter, reference, *FINAL)
    assert result.returncode == 0, result.stderr
    files = digest(reference)
    assert sum(name.endswith(".safetensors") for name in files) == SHARDS
    return files


def shard_names(files: dict[str, str]) -> list[str]:
    return sorted(name for name in files if name.endswith(".safetensors"))


def api_merge(base: Path, adapter: Path, out: Path, **options: object):
    """The Python API, in this process (the CLI is a thin layer over it)."""
    settings = {"dtype": "bf16", "max_shard_size": "300kB", "max_memory": "2MB", "quiet": True}
    return merge(MergeOptions(base, adapter, out, **settings, **options))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_parts_then_final_step_match_one_run(inputs, tmp_path, count):
    """N parts write disjoint shards (k % N == I), the final step computes none, and OUT is
    byte-identical to one run of the same merge (the Python API, in this process)."""
    base, adapter = inputs
    out = tmp_path / "merged"
    api_merge(base, adapter, tmp_path / "one-run", resume=True)
    expected = digest(tmp_path / "one-run")
    names = shard_names(expected)
    for index in range(count):
        summary = api_merge(base, adapter, out, part=f"{index}/{count}")
        assert summary.part == f"{index}/{count}"
        assert summary.files == names[index::count]
        assert summary.computed_shards == len(names[index::count])
        assert not out.exists()

    summary = api_merge(base, adapter, out, resume=True)
    assert (summary.resumed_shards, summary.computed_shards) == (SHARDS, 0)
    assert not summary.warnings
    assert digest(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "one-run"]


def test_plain_run_gives_the_same_shards_index_and_config(inputs, one_run, tmp_path):
    """Parts and --resume change no tensor byte: a plain run (no journal) writes the same files,
    the model card aside (it records the command line)."""
    base, adapter = inputs
    plain = tmp_path / "plain"
    assert run_cli(base, adapter, plain, *OPTIONS).returncode == 0
    without_card = {k: v for k, v in one_run.items() if k != "README.md"}
    assert {k: v for k, v in digest(plain).items() if k != "README.md"} == without_card


def test_a_part_never_run_is_computed_by_the_final_step(inputs, one_run, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    run_part(base, adapter, out, "0/3")
    run_part(base, adapter, out, "2/3")

    summary, stderr = finish(base, adapter, out)
    missing = len(shard_names(one_run)[1::3])
    assert summary["computed_shards"] == missing == 2
    assert summary["resumed_shards"] == SHARDS - missing
    note = f"{missing} of {SHARDS} shard(s) came from no part"
    assert note in stderr
    assert any(note in warning for warning in summary["warnings"])
    assert digest(out) == one_run


def test_a_damaged_shard_from_a_part_is_computed_again(inputs, one_run, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    run_part(base, adapter, out, "0/2")
    run_part(base, adapter, out, "1/2")
    damaged = parts_area(out) / shard_names(one_run)[3]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))

    summary, _ = finish(base, adapter, out)
    assert summary["computed_shards"] == 1
    assert digest(out) == one_run


def test_a_part_of_another_plan_is_refused(inputs, tmp_path):
    """Parts with other options cannot mix their shards into the area: exit 6, one line."""
    base, adapter = inputs
    out = tmp_path / "merged"
    run_part(base, adapter, out, "0/2")
    before = digest(parts_area(out))
    result = run_cli(base, adapter, out, *OPTIONS, "--dtype", "fp16", "--part", "1/2")
    assert result.returncode == EXIT_OUTPUT_REFUSED
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error: "), result.stderr
    assert "part 0/2 was run with other options" in lines[0]
    assert digest(parts_area(out)) == before


def test_a_final_step_of_another_plan_rejects_the_parts_shards(inputs, tmp_path):
    """The final step with other options keeps none of the parts' shards, and says so."""
    base, adapter = inputs
    out, reference = tmp_path / "merged", tmp_path / "reference"
    run_part(base, adapter, out, "0/2")
    run_part(base, adapter, out, "1/2")
    other = (*FINAL, "--dtype", "fp16")
    assert run_cli(base, adapter, reference, *other).returncode == 0

    result = run_cli(base, adapter, out, *other)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == 0
    assert summary["computed_shards"] == SHARDS
    assert "part 0/2's 3 shard(s)" in result.stderr and "belong to another merge" in result.stderr
    assert digest(out) == digest(reference)


@needs_sigstop
def test_a_part_killed_mid_write_and_rerun(inputs, one_run, tmp_path):
    """SIGKILL part 0 while it writes its first shard; rerun it: OUT is still identical."""
    base, adapter = inputs
    out = tmp_path / "merged"
    process = start_merge_stopped_at(
        FIRST_TENSOR_WRITE, base, adapter, out, *OPTIONS, "--part", "0/2",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    process.kill()
    process.wait()
    left = sorted(p.name for p in parts_area(out).iterdir())
    assert left and all(name.endswith(".part-0-of-2.tmp") for name in left), left

    run_part(base, adapter, out, "1/2")
    rerun = run_part(base, adapter, out, "0/2")
    assert rerun["computed_shards"] == SHARDS // 2
    assert not list(parts_area(out).glob("*.tmp"))
    summary, _ = finish(base, adapter, out)
    assert summary["computed_shards"] == 0
    assert digest(out) == one_run


@needs_sigstop
def test_a_killed_part_not_rerun_leaves_its_journaled_shards(inputs, one_run, tmp_path):
    """A part killed after its first shard: that shard is kept, the final step computes its others."""
    base, adapter = inputs
    out = tmp_path / "merged"
    process = start_merge_stopped_at(
        FIRST_JOURNALED_SHARD, base, adapter, out, *OPTIONS, "--part", "1/2",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    process.kill()
    process.wait()
    run_part(base, adapter, out, "0/2")

    summary, stderr = finish(base, adapter, out)
    assert summary["resumed_shards"] == SHARDS // 2 + 1
    assert summary["computed_shards"] == SHARDS // 2 - 1
    assert f"{SHARDS // 2 - 1} of {SHARDS} shard(s) came from no part" in stderr
    assert digest(out) == one_run


@needs_sigstop
def test_parts_running_at_once_keep_each_others_entries(inputs, one_run, tmp_path):
    """Part 0 frozen mid-write while part 1 runs whole (and cleans up dead runs' folders):
    the shared area survives, both journals are intact, and nothing is computed twice."""
    base, adapter = inputs
    out = tmp_path / "merged"
    frozen = start_merge_stopped_at(
        FIRST_TENSOR_WRITE, base, adapter, out, *OPTIONS, "--part", "0/2", "--json", "-q",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        run_part(base, adapter, out, "1/2")
        assert remove_stale_staging_folders(out) == []
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    stdout, stderr = frozen.communicate(timeout=300)
    assert frozen.returncode == 0, stderr
    assert json.loads(stdout)["computed_shards"] == SHARDS // 2
    journals = sorted(p.name for p in parts_area(out).glob(".lora-merge-journal*"))
    assert journals == [
        ".lora-merge-journal.part-0-of-2.json",
        ".lora-merge-journal.part-1-of-2.json",
    ]

    summary, _ = finish(base, adapter, out)
    assert summary["resumed_shards"] == SHARDS
    assert digest(out) == one_run


def test_a_final_step_without_resume_says_it_ignores_the_parts(inputs, one_run, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    run_part(base, adapter, out, "0/2")
    before = digest(parts_area(out))
    result = run_cli(base, adapter, out, *OPTIONS, "--json")
    assert result.returncode == 0, result.stderr
    assert "lora-merge: warning: merged's parts (--part) wrote shards beside it" in result.stderr
    assert json.loads(result.stdout)["resumed_shards"] == 0
    assert digest(parts_area(out)) == before


def test_a_rerun_part_with_resume_keeps_its_verified_shards(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    run_part(base, adapter, out, "1/3")
    again = run_part(base, adapter, out, "1/3", "--resume")
    assert (again["computed_shards"], again["resumed_shards"]) == (0, 2)


@pytest.mark.parametrize("part", ["3/3", "x"])
def test_a_part_that_is_not_i_of_n_is_a_usage_error(inputs, tmp_path, part):
    base, adapter = inputs
    result = run_cli(base, adapter, tmp_path / "merged", "--part", part)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.startswith(f"lora-merge: error: --part {part!r}")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"part": "1/0"}, "--part '1/0'"),
        ({"part": "-1/2"}, "is not I/N"),
        ({"part": "1"}, "is not I/N"),
        ({"part": "0/2", "save_method": "lora"}, "--save-method lora"),
        ({"part": "0/2", "push_to_hub": "me/merged"}, "to the final step only"),
    ],
)
def test_part_values_and_conflicts_are_refused_before_any_work(tmp_path, options, named):
    """Checked with the other options, before any input is read (BASE does not even exist)."""
    with pytest.raises(UsageError, match=named.replace("(", r"\(")):
        checked_options(
            MergeOptions(tmp_path / "no-base", tmp_path / "no-adapter", tmp_path / "o", **options)
        )


def test_dry_run_says_which_shards_a_part_would_write(inputs, one_run, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    result = run_cli(base, adapter, out, *OPTIONS, "--part", "1/4", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    assert list(preview["output_shards"]) == shard_names(one_run)
    assert preview["part"] == "1/4"
    assert preview["part_shards"] == [shard_names(one_run)[k] for k in (1, 5)]

    text = run_cli(base, adapter, out, *OPTIONS, "--part", "1/4", "--dry-run")
    assert text.returncode == 0
    assert f"1/4 writes 2 of {SHARDS} shard(s): " in text.stdout
    assert sorted(tmp_path.iterdir()) == []


@needs_sigstop
def test_a_final_step_interrupted_gives_the_parts_area_back(inputs, one_run, tmp_path):
    """SIGTERM the final step while it computes a missing part: the parts' shards are not lost;
    the next final step keeps them and finishes OUT identical to one run."""
    base, adapter = inputs
    out = tmp_path / "merged"
    run_part(base, adapter, out, "0/3")
    run_part(base, adapter, out, "1/3")
    final = start_merge_stopped_at(
        FIRST_TENSOR_WRITE, base, adapter, out, *FINAL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.kill(final.pid, signal.SIGTERM)
    os.kill(final.pid, signal.SIGCONT)
    final.communicate(timeout=300)
    assert final.returncode == 143
    assert not out.exists()
    # Back with the final step's journal: the parts' 4 shards (its own torn one is not listed).
    journal = json.loads((parts_area(out) / ".lora-merge-journal.json").read_text())
    assert len(journal["shards"]) == 4

    summary, _ = finish(base, adapter, out)
    assert (summary["resumed_shards"], summary["computed_shards"]) == (4, 2)
    assert digest(out) == one_run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
