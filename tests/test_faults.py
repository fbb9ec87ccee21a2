"""Faults a long unattended merge meets: NaN/Inf, a killed run, a full disk, a file changing under us.

Each runs the installed command in a subprocess, on real files (and, for the
full disk, a real tmpfs), and checks the exit code, the one-line message, that
no OUT is left behind when the merge fails, and that inputs are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import (
    adapter_tensors,
    write_adapter,
    write_base,
    write_big_base_and_adapter,
)
from merge_process import (
    FIRST_JOURNALED_SHARD,
    LORA_MERGE,
    needs_sigstop,
    resume,
    start_merge_frozen_mid_write,
    start_merge_stopped_at,
)
from safetensors.torch import load_file, save_file

EXIT_INVALID_INPUT = 4
EXIT_OUTPUT_REFUSED = 6
EXIT_NONFINITE = 7
JOURNAL = ".lora-merge-journal.json"


def run_cli(*args: object, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lora-merge: error: ")
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


# --- NaN and Inf -----------------------------------------------------------------------------


def test_nan_in_the_adapter_is_refused_and_named(tmp_path: Path) -> None:
    """A NaN in lora_B is refused like PEFT's safe_merge, naming the adapter tensor."""
    write_base(tmp_path / "base")
    tensors = adapter_tensors()
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    write_adapter(tmp_path / "adapter", tensors)

    result = run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert result.returncode == EXIT_NONFINITE
    line = one_error_line(result)
    assert key in line and "--allow-nonfinite" in line
    assert not (tmp_path / "merged").exists()


def test_allow_nonfinite_writes_the_nan_through(tmp_path: Path) -> None:
    """With --allow-nonfinite the same adapter merges, and the NaN row shows in OUT."""
    write_base(tmp_path / "base")
    tensors = adapter_tensors()
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 1] = float("nan")
    write_adapter(tmp_path / "adapter", tensors)

    result = run_cli(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "--allow-nonfinite", "-q"
    )
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "merged" / "model.safetensors")[
        "model.layers.1.self_attn.v_proj.weight"
    ]
    assert torch.isnan(merged[3]).all() and torch.isfinite(merged[4]).all()


def test_sum_overflowing_fp16_is_refused(tmp_path: Path) -> None:
    """W + delta = 70000, beyond fp16's 65504, becomes Inf in a --dtype fp16 output: refused, cause named."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": torch.full((8, 8), 60000.0)},
        base / "model.safetensors",
    )
    lora = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full(
            (8, 1), 10000.0
        ),
    }
    write_adapter(adapter, lora, r=1, lora_alpha=1)

    result = run_cli(base, adapter, tmp_path / "merged", "--dtype", "fp16")
    assert result.returncode == EXIT_NONFINITE
    assert "overflows torch.float16" in one_error_line(result)
    assert run_cli(base, adapter, tmp_path / "ok", "--dtype", "fp32", "-q").returncode == 0


def test_conversion_overflowing_fp16_is_refused(tmp_path: Path) -> None:
    """An untouched tensor too large for fp16 is not silently turned into Inf by --dtype fp16."""
    write_base(tmp_path / "base")
    tensors = load_file(tmp_path / "base" / "model-00001-of-00002.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = 1e6
    save_file(
        tensors, tmp_path / "base" / "model-00001-of-00002.safetensors", metadata={"format": "pt"}
    )
    write_adapter(tmp_path / "adapter")

    result = run_cli(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "--dtype", "fp16"
    )
    assert result.returncode == EXIT_NONFINITE
    assert f"converting {name!r}" in one_error_line(result)


# --- a killed run, resumed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_big_base_and_adapter(tmp_path_factory.mktemp("resume"))


RESUMABLE = (
    "--dtype",
    "bf16",
    "--max-shard-size",
    "12MB",
    "--max-memory",
    "2MB",
    "--resume",
    "--json",
)


def _kill_after_first_journaled_shard(base: Path, adapter: Path, out: Path) -> Path:
    """Run a resumable merge that stops itself once its first shard is journaled; SIGKILL it."""
    process = start_merge_stopped_at(
        FIRST_JOURNALED_SHARD,
        base,
        adapter,
        out,
        *RESUMABLE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    process.kill()
    process.wait()
    assert not out.exists()
    (journal,) = out.parent.glob(f".{out.name}.lora-merge-partial-*/{JOURNAL}")
    assert json.loads(journal.read_text())["shards"], "the journal lists no shard"
    return journal.parent


@pytest.fixture(scope="module")
def uninterrupted_digests(sharded_inputs, tmp_path_factory) -> dict[str, str]:
    """The files of the same merge run without interruption, by sha256."""
    base, adapter = sharded_inputs
    reference = tmp_path_factory.mktemp("reference") / "merged"
    assert run_cli(base, adapter, reference, *RESUMABLE).returncode == 0
    return digest(reference)


@needs_sigstop
def test_resume_after_sigkill_keeps_finished_shards_and_matches_an_uninterrupted_run(
    sharded_inputs, uninterrupted_digests, tmp_path
):
    """SIGKILL mid-merge, then --resume: verified shards are kept, the result is byte-identical."""
    base, adapter = sharded_inputs
    out = tmp_path / "merged"
    leftover = _kill_after_first_journaled_shard(base, adapter, out)
    kept = json.loads((leftover / JOURNAL).read_text())["shards"]

    result = run_cli(base, adapter, out, *RESUMABLE)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] == len(kept) >= 1
    assert summary["shards"] > summary["resumed_shards"]
    assert digest(out) == uninterrupted_digests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@needs_sigstop
def test_resume_rewrites_a_journaled_shard_whose_checksum_no_longer_matches(
    sharded_inputs, uninterrupted_digests, tmp_path
):
    """A kept shard is trusted only after its sha256 is checked: a damaged one is written again."""
    base, adapter = sharded_inputs
    out = tmp_path / "merged"
    leftover = _kill_after_first_journaled_shard(base, adapter, out)
    damaged = leftover / next(iter(json.loads((leftover / JOURNAL).read_text())["shards"]))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))

    result = run_cli(base, adapter, out, *RESUMABLE)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resumed_shards"] == 0
    assert digest(out) == uninterrupted_digests


@needs_sigstop
def test_without_resume_a_dead_runs_leftovers_are_discarded(sharded_inputs, tmp_path):
    """A plain rerun never trusts a dead run's files: it starts over and cleans them up."""
    base, adapter = sharded_inputs
    out = tmp_path / "merged"
    _kill_after_first_journaled_shard(base, adapter, out)
    result = run_cli(base, adapter, out, "--dtype", "bf16", "--max-shard-size", "12MB", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resumed_shards"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# --- files that change or point elsewhere ------------------------------------------------------


@needs_sigstop
def test_base_shard_shrinking_mid_merge_is_a_clean_error(tmp_path):
    """A base file truncated while it is read gives exit 4 and a message, not a crash or garbage."""
    base, adapter = write_big_base_and_adapter(tmp_path / "inputs")
    out = tmp_path / "merged"
    process = start_merge_frozen_mid_write(base, adapter, out)
    shard = base / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    _, stderr = resume(process)

    assert process.returncode == EXIT_INVALID_INPUT, stderr
    line = stderr.strip().splitlines()[-1]
    assert "model.safetensors" in line and "truncated or changed" in line
    assert not out.exists()


def test_shard_linked_from_outside_base_is_refused(tmp_path):
    """An index may name only files in BASE; a symlink that leaves BASE is not followed."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    shard = tmp_path / "base" / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)

    result = run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert result.returncode == EXIT_INVALID_INPUT
    assert "outside" in one_error_line(result)


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path):
    """The Hub cache's snapshots/<rev>/file -> ../../blobs/<hash> links are the one allowed exception."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    write_base(tmp_path / "plain")
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in (tmp_path / "plain").iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    write_adapter(tmp_path / "adapter")

    result = run_cli(snapshot, tmp_path / "adapter", tmp_path / "merged", "-q")
    assert result.returncode == 0, result.stderr


def test_key_stored_in_two_shards_is_refused(tmp_path):
    """Two shards holding the same tensor make the checkpoint ambiguous: refused, naming the key."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    first = tmp_path / "base" / "model-00001-of-00002.safetensors"
    second = tmp_path / "base" / "model-00002-of-00002.safetensors"
    duplicate_name, duplicate = next(iter(load_file(first).items()))
    both = {**load_file(second), duplicate_name: duplicate}
    save_file(both, second, metadata={"format": "pt"})

    result = run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert result.returncode == EXIT_INVALID_INPUT
    assert repr(duplicate_name) in one_error_line(result) and "twice" in result.stderr


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="Windows has no POSIX permission bits: chmod(0) only marks a file read-only, so it "
    "stays readable (an unreadable file there needs an ACL; the error path is the same OSError)",
)
def test_unreadable_shard_is_a_clean_error(tmp_path):
    """A shard without read permission is named, with exit 4.

    As root, permissions do not apply; the run then drops the capabilities that
    bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) so that it sees what a
    normal user sees.
    """
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    shard = tmp_path / "base" / "model-00001-of-00002.safetensors"
    shard.chmod(0)
    prefix = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        if sys.platform == "linux" and os.geteuid() == 0
        else []
    )
    result = subprocess.run(
        [
            *prefix,
            LORA_MERGE,
            str(tmp_path / "base"),
            str(tmp_path / "adapter"),
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_INVALID_INPUT, result.stderr
    line = one_error_line(result)
    assert "model-00001-of-00002.safetensors" in line and "ermission denied" in line
    assert not (tmp_path / "merged").exists()


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 100 MB tmpfs, when this machine lets the test mount one."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_out_on_a_disk_too_small_is_refused_before_writing(tmp_path, small_filesystem):
    """The free-space check runs before anything is written: exit 6, nothing left on the disk."""
    base, adapter = write_big_base_and_adapter(tmp_path / "inputs")
    result = run_cli(base, adapter, small_filesystem / "merged")
    assert result.returncode == EXIT_OUTPUT_REFUSED
    assert "GB are free" in one_error_line(result)
    assert list(small_filesystem.iterdir()) == []


@needs_sigstop
def test_disk_filling_up_mid_write_is_a_clean_error(tmp_path, small_filesystem):
    """A real ENOSPC while writing: exit 6 with 'disk is full', and the partial output is removed."""
    base, adapter = write_big_base_and_adapter(
        tmp_path / "inputs", tensors=6, side=1024
    )  # 12 MB as bf16
    out = small_filesystem / "merged"
    process = start_merge_frozen_mid_write(base, adapter, out)
    filler = os.open(small_filesystem / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # take all the space that is left
        while os.write(filler, b"\0" * 2**16):
            pass
    except OSError:
        pass
    finally:
        os.close(filler)
    _, stderr = resume(process)

    assert process.returncode == EXIT_OUTPUT_REFUSED, stderr
    assert "disk is full" in stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in small_filesystem.iterdir()) == ["filler"]
