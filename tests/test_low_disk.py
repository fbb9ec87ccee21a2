"""``--low-disk``: Hub to Hub in bounded local disk, against a local Hub server.

``fake_hub`` serves the inputs as the Hub does (repo info, tree, ``resolve`` with a
302 to a CDN host, ranged GETs) and takes the upload (preupload, LFS, one commit),
so huggingface_hub's real client runs end to end without the network. The oracles
are independent of the code under test: a plain merge of the same inputs (the
whole base downloaded by huggingface_hub, no range requests, OUT kept locally)
compared file by file, hashlib over the bytes the Hub received, and the sizes of
the files in the staging folder at every moment a shard is finished or uploaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, Fault, start_fake_hub
from handmade_checkpoints import write_adapter, write_base
from hub_runs import ADAPTER_REPO, BASE_REPO, SHARD_SIZE, TARGET, push_env, run_cli
from safetensors import safe_open

from lora_merge.errors import EXIT_INPUT_NOT_FOUND, EXIT_PUSH_FAILED, EXIT_USAGE


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


def low_disk_run(hub: FakeHub, out: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(
        BASE_REPO,
        ADAPTER_REPO,
        out,
        "--push-to-hub",
        TARGET,
        "--low-disk",
        "--max-shard-size",
        SHARD_SIZE,
        "--json",
        "-q",
        *extra,
        env=push_env(hub, home),
    )


def plain_merge(hub: FakeHub, out: Path, home: Path) -> dict[str, bytes]:
    """The oracle: the same Hub inputs merged the ordinary way (whole base downloaded)."""
    result = run_cli(
        BASE_REPO, ADAPTER_REPO, out, "--max-shard-size", SHARD_SIZE, "-q", env=push_env(hub, home)
    )
    assert result.returncode == 0, result.stderr
    return {path.name: path.read_bytes() for path in out.iterdir()}


def cached_base_shards(home: Path) -> list[Path]:
    return list((home / "hub" / "models--org--base-model").rglob("*.safetensors"))


def test_hub_to_hub_output_is_byte_identical_to_a_plain_merge(hub: FakeHub, tmp_path: Path) -> None:
    """Every file on the Hub equals the plain merge's, except the card's one command line;
    base shards are read by range requests (through a dropped connection and a 500) and
    never stored; one commit; OUT keeps the small files only."""
    expected = plain_merge(hub, tmp_path / "plain", tmp_path / "home-plain")
    shards = sorted(name for name in expected if name.endswith(".safetensors"))
    assert len(shards) == 4
    ranges_before = hub.ranges_served
    hub.faults = [
        Fault("/cdn/", drop_after=100, times=1),  # a connection dropped mid-body
        Fault("/cdn/", status=500, times=1),  # a server error
    ]

    home = tmp_path / "home-low-disk"
    result = low_disk_run(hub, tmp_path / "out", home)

    assert result.returncode == 0, result.stderr
    assert all(fault.times == 0 for fault in hub.faults)  # both failures happened
    received = hub.repos[TARGET].branches["main"]
    assert sorted(received) == sorted(expected)
    for name in sorted(expected):
        if name != "README.md":
            assert received[name] == expected[name], name
    # The card differs only in the command line it records.
    changed = [
        line
        for line in difflib.unified_diff(
            expected["README.md"].decode().splitlines(),
            received["README.md"].decode().splitlines(),
            lineterm="",
            n=0,
        )
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert changed == [
        f"-lora-merge {BASE_REPO} {ADAPTER_REPO} OUT --max-shard-size {SHARD_SIZE} -q",
        f"+lora-merge {BASE_REPO} {ADAPTER_REPO} OUT --push-to-hub {TARGET} --low-disk "
        f"--max-shard-size {SHARD_SIZE} --json -q",
    ]
    assert hub.repos[TARGET].commit_messages == [hub.repos[TARGET].commit_messages[0]]
    assert {hashlib.sha256(expected[name]).hexdigest() for name in shards} <= set(hub.lfs_objects)
    assert hub.ranges_served > ranges_before
    assert cached_base_shards(home) == []  # the base's shards were never downloaded
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors.index.json",
        "tokenizer_config.json",
    ]
    summary = json.loads(result.stdout)
    assert summary["pushed_to"] == TARGET and summary["shards"] == 4
    assert summary["commit_url"].startswith(f"{hub.url}/{TARGET}/commit/")


def test_local_merge_of_the_same_files_differs_only_in_the_recorded_input_names(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Against a merge of the local folders: same tensors, same bytes; the shards' metadata
    name the inputs (``org/name@commit`` instead of a local path) and nothing else differs."""
    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    local = tmp_path / "local"
    result = run_cli(base, adapter, local, "--max-shard-size", SHARD_SIZE, "-q")
    assert result.returncode == 0, result.stderr
    pushed = low_disk_run(hub, tmp_path / "out", tmp_path / "home")
    assert pushed.returncode == 0, pushed.stderr
    received = hub.repos[TARGET].branches["main"]
    for shard in sorted(local.glob("*.safetensors")):
        copy = tmp_path / "received.safetensors"
        copy.write_bytes(received[shard.name])
        with safe_open(shard, "pt") as mine, safe_open(copy, "pt") as theirs:
            assert list(mine.keys()) == list(theirs.keys())
            for key in mine.keys():  # noqa: SIM118 - safe_open is not iterable
                assert torch.equal(mine.get_tensor(key), theirs.get_tensor(key)), key
            ours, hubs = mine.metadata(), theirs.metadata()
        assert {k for k in ours if ours[k] != hubs[k]} == {"lora_merge.base", "lora_merge.adapter"}
        assert hubs["lora_merge.base"].startswith(f"{BASE_REPO}@")
    for name in ("config.json", "model.safetensors.index.json", "tokenizer_config.json"):
        assert received[name] == (local / name).read_bytes()


def test_a_base_already_in_the_cache_is_read_from_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    home = tmp_path / "home"
    expected = plain_merge(hub, tmp_path / "plain", home)  # downloads the whole base
    ranges_before = hub.ranges_served
    result = low_disk_run(hub, tmp_path / "out", home)
    assert result.returncode == 0, result.stderr
    assert hub.ranges_served == ranges_before  # no ranged read: the cache served them
    received = hub.repos[TARGET].branches["main"]
    assert all(received[n] == expected[n] for n in expected if n.endswith(".safetensors"))


# The peak is read at the moments local disk use can be highest: right after a shard is
# written (the previous one may still be uploading) and right before and after each
# preupload (before its shard is deleted). Events, not a sampling thread: no race.
DISK_PROBE = """
import json, sys
from pathlib import Path
from huggingface_hub import HfApi
import lora_merge.run.shards as shards
from lora_merge import MergeOptions, merge

samples = []
def used(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())

write_shard = shards.write_shard
def probed_write_shard(path, *args, **kwargs):
    write_shard(path, *args, **kwargs)
    samples.append(used(path.parent))
shards.write_shard = probed_write_shard

preupload = HfApi.preupload_lfs_files
def probed_preupload(self, repo_id, additions, **kwargs):
    additions = list(additions)
    shard = additions[0].path_or_fileobj  # the final commit preuploads too: not a shard
    if not (isinstance(shard, str) and shard.endswith(".safetensors")):
        return preupload(self, repo_id, additions, **kwargs)
    samples.append(used(Path(shard).parent))
    preupload(self, repo_id, additions, **kwargs)
    samples.append(used(Path(shard).parent))
HfApi.preupload_lfs_files = probed_preupload

base, adapter, out, target, shard_size = sys.argv[1:]
merge(MergeOptions(base, adapter, out, push_to_hub=target, low_disk=True,
                   max_shard_size=shard_size, quiet=True))
print(json.dumps(samples))
"""


def test_local_disk_holds_at_most_two_shards_plus_the_small_files(
    hub: FakeHub, tmp_path: Path
) -> None:
    shard_size = "8KB"  # 8 shards
    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    local = tmp_path / "local"
    result = run_cli(base, adapter, local, "--max-shard-size", shard_size, "-q")
    assert result.returncode == 0, result.stderr
    shard_files = sorted((p.stat().st_size for p in local.glob("*.safetensors")), reverse=True)
    small_files = sum(p.stat().st_size for p in local.iterdir() if p.suffix != ".safetensors")
    assert len(shard_files) >= 6

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            DISK_PROBE,
            BASE_REPO,
            ADAPTER_REPO,
            str(tmp_path / "out"),
            TARGET,
            shard_size,
        ],
        capture_output=True,
        text=True,
        env=push_env(hub, tmp_path / "home"),
        timeout=300,
    )

    assert probe.returncode == 0, probe.stderr
    samples = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(samples) == 3 * len(shard_files)
    assert max(samples) <= shard_files[0] + shard_files[1] + small_files
    assert max(samples) >= shard_files[-1]  # the probe saw shards on disk
    assert min(samples[1:]) < sum(shard_files)  # and saw them go


def test_failed_commit_leaves_nothing_and_resume_skips_the_uploaded_shards(
    hub: FakeHub, tmp_path: Path
) -> None:
    expected = plain_merge(hub, tmp_path / "plain", tmp_path / "home-plain")
    out, home = tmp_path / "out", tmp_path / "home"
    hub.refuse_commits_with = 403

    failed = low_disk_run(hub, out, home, "--resume")

    assert failed.returncode == EXIT_PUSH_FAILED
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "nothing was committed" in failed.stderr
    assert hub.repos[TARGET].branches["main"] == {}  # nothing visible on the Hub
    assert not out.exists()
    assert not list(tmp_path.glob(".out.lora-merge-partial-*"))
    journal = json.loads((tmp_path / ".out.lora-merge-uploads.json").read_text())
    assert len(journal["shards"]) == 4

    hub.refuse_commits_with = None
    puts_before = sum(r.startswith("PUT ") for r in hub.requests)
    resumed = low_disk_run(hub, out, home, "--resume")

    assert resumed.returncode == 0, resumed.stderr
    assert sum(r.startswith("PUT ") for r in hub.requests) == puts_before  # no shard again
    assert json.loads(resumed.stdout)["resumed_shards"] == 4
    received = hub.repos[TARGET].branches["main"]
    assert all(received[n] == expected[n] for n in expected if n != "README.md")
    assert not (tmp_path / ".out.lora-merge-uploads.json").exists()


def test_resume_rewrites_a_journaled_shard_the_hub_does_not_hold(
    hub: FakeHub, tmp_path: Path
) -> None:
    expected = plain_merge(hub, tmp_path / "plain", tmp_path / "home-plain")
    out, home = tmp_path / "out", tmp_path / "home"
    hub.refuse_commits_with = 403
    assert low_disk_run(hub, out, home, "--resume").returncode == EXIT_PUSH_FAILED
    lost = sorted(hub.lfs_objects)[0]
    hub.repo_objects[TARGET].discard(lost)  # e.g. garbage-collected: the journal is not trusted
    hub.refuse_commits_with = None

    resumed = low_disk_run(hub, out, home, "--resume")

    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_shards"] == 3
    assert f"PUT /lfs-upload/{lost}" in hub.requests
    received = hub.repos[TARGET].branches["main"]
    assert all(received[n] == expected[n] for n in expected if n != "README.md")


@pytest.mark.parametrize(("status", "says"), [(401, "HF_TOKEN"), (404, "not there")])
def test_a_ranged_read_the_hub_refuses_is_one_line_and_no_commit(
    hub: FakeHub, tmp_path: Path, status: int, says: str
) -> None:
    """Refusals are not retried: a 401 (token) or 404 (file gone) ends the run at once."""
    hub.faults = [Fault("/cdn/", status=status, times=1000)]  # headers and tensors alike
    result = low_disk_run(hub, tmp_path / "out", tmp_path / "home")
    assert result.returncode == EXIT_INPUT_NOT_FOUND
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"({status})" in lines[0] and says in lines[0], result.stderr
    assert sum("/cdn/" in r for r in hub.requests if r.startswith("GET")) == 1
    assert TARGET not in hub.repos or hub.repos[TARGET].branches["main"] == {}
    assert not (tmp_path / "out").exists()


def test_a_base_repo_that_does_not_exist_is_one_line(hub: FakeHub, tmp_path: Path) -> None:
    result = run_cli(
        "org/nothing-here",
        ADAPTER_REPO,
        tmp_path / "out",
        "--push-to-hub",
        TARGET,
        "--low-disk",
        env=push_env(hub, tmp_path / "home"),
    )
    assert result.returncode == EXIT_INPUT_NOT_FOUND
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot be found" in result.stderr
    assert not (tmp_path / "out").exists()


def online_env() -> dict[str, str]:
    """The suite runs with HF_HUB_OFFLINE=1 (conftest.py); a Hub that is not there instead."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}


def test_low_disk_offline_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE: no upload can happen, so no base shard can be read remotely either."""
    result = run_cli(
        BASE_REPO, ADAPTER_REPO, tmp_path / "out", "--push-to-hub", TARGET, "--low-disk"
    )
    assert result.returncode == EXIT_USAGE
    assert len(result.stderr.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--low-disk"], "needs --push-to-hub"),
        (["--low-disk", "--push-to-hub", TARGET, "--verify"], "--verify cannot be used"),
        (
            ["--low-disk", "--push-to-hub", TARGET, "--save-method", "lora"],
            "--save-method lora cannot be used",
        ),
    ],
)
def test_low_disk_options_are_checked_before_anything_is_read(
    tmp_path: Path, options: list[str], message: str
) -> None:
    result = run_cli(
        tmp_path / "no-base", tmp_path / "no-adapter", tmp_path / "out", *options, env=online_env()
    )
    assert result.returncode == EXIT_USAGE
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_says_how_much_local_disk_the_run_needs(tmp_path: Path) -> None:
    """A local BASE is allowed: it needs no ranged reads, and the upload side still bounds disk."""
    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    write_base(base, shards=2)
    write_adapter(adapter)
    common = [base, adapter, tmp_path / "out", "--max-shard-size", SHARD_SIZE, "--dry-run"]
    env = online_env()
    plain = json.loads(run_cli(*common, "--json", env=env).stdout)
    low = json.loads(
        run_cli(*common, "--json", "--low-disk", "--push-to-hub", TARGET, env=env).stdout
    )
    text = run_cli(*common, "--low-disk", "--push-to-hub", TARGET, env=env).stdout

    sizes = sorted(plain["output_shards"].values(), reverse=True)
    assert plain["disk_needed_bytes"] == plain["output_bytes"] == sum(sizes)
    assert low["disk_needed_bytes"] == sizes[0] + sizes[1] < low["output_bytes"]
    assert low["low_disk"] is True
    assert "--low-disk: 2 shards at most" in text
    assert not (tmp_path / "out").exists()


def test_a_local_base_is_allowed_and_gives_the_plain_merge(hub: FakeHub, tmp_path: Path) -> None:
    """A local BASE needs no ranged reads; the upload side still bounds disk."""
    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    plain = tmp_path / "plain"
    result = run_cli(base, adapter, plain, "--max-shard-size", SHARD_SIZE, "-q")
    assert result.returncode == 0, result.stderr
    common = ["--push-to-hub", TARGET, "--low-disk", "--max-shard-size", SHARD_SIZE, "-q"]
    pushed = run_cli(base, adapter, tmp_path / "out", *common, env=push_env(hub, tmp_path / "h"))
    assert pushed.returncode == 0, pushed.stderr
    assert hub.ranges_served == 0
    received = hub.repos[TARGET].branches["main"]
    assert sorted(received) == sorted(p.name for p in plain.iterdir())
    for path in plain.iterdir():
        if path.name != "README.md":
            assert received[path.name] == path.read_bytes(), path.name
