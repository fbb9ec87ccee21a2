"""How many threads merge: the CPUs the process may use (affinity, cgroup CPU quota), or --threads.

The cgroup tests build the files Linux shows (``/proc/self/cgroup`` and a cgroup
mount) in a temporary folder and hand their paths in, so each layout (cgroup v1,
v2, a container that sees its own cgroup as the root) is checked on any machine.
The CLI tests check the count a run reports and that a one-thread merge writes
the pinned bytes of tests/test_pinned_outputs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pinned_outputs import PINNED, build_case, output_digests

from lora_merge.io.cpus import cgroup_cpu_quota, usable_cpu_count

LORA_MERGE = str(Path(sys.executable).with_name("lora-merge"))
EIGHT_CPUS = range(8)


def cgroup_tree(tmp_path: Path, proc_lines: list[str], files: dict[str, str]) -> tuple[Path, Path]:
    """A fake ``/proc/self/cgroup`` and cgroup mount: ``files`` maps paths under the mount to text."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("".join(line + "\n" for line in proc_lines))
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc, root


def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path, ["0::/user.slice/job"], {"user.slice/job/cpu.max": "200000 100000"}
    )
    assert cgroup_cpu_quota(proc, root) == 2.0
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 2


def test_a_fractional_quota_counts_as_the_next_whole_cpu(tmp_path: Path) -> None:
    proc, root = cgroup_tree(tmp_path, ["0::/job"], {"job/cpu.max": "150000 100000"})
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 2
    proc, root = cgroup_tree(tmp_path / "small", ["0::/job"], {"job/cpu.max": "20000 100000"})
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    proc, root = cgroup_tree(tmp_path, ["0::/job"], {"job/cpu.max": "max 100000"})
    assert cgroup_cpu_quota(proc, root) is None
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 8
    # A quota larger than the affinity: the affinity is what the process runs on.
    proc, root = cgroup_tree(tmp_path / "wide", ["0::/job"], {"job/cpu.max": "1600000 100000"})
    assert usable_cpu_count(range(3), proc, root) == 3


def test_a_parents_quota_holds_for_its_children(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        ["0::/slurm/job_7/step_0"],
        {
            "slurm/cpu.max": "max 100000",
            "slurm/job_7/cpu.max": "300000 100000",
            "slurm/job_7/step_0/cpu.max": "800000 100000",
        },
    )
    assert cgroup_cpu_quota(proc, root) == 3.0
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 3


def test_a_container_reads_its_own_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    """The process's path names the host's tree; the container's mount shows its cgroup as root."""
    proc, root = cgroup_tree(
        tmp_path, ["0::/kubepods/burstable/pod1/container"], {"cpu.max": "400000 100000"}
    )
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 4


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        ["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc", "0::/"],
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        },
    )
    assert cgroup_cpu_quota(proc, root) == 2.5
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 3


def test_cgroup_v1_without_a_quota(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        ["2:cpuacct:/", "1:cpu:/"],
        {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
    )
    assert cgroup_cpu_quota(proc, root) is None
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 8


def test_no_cgroup_files_leave_the_affinity(tmp_path: Path) -> None:
    """macOS, Windows, or a /proc that cannot be read: the affinity alone."""
    missing = tmp_path / "absent"
    assert cgroup_cpu_quota(missing, missing) is None
    assert usable_cpu_count(range(5), missing, missing) == 5


def test_garbled_cgroup_files_are_no_quota(tmp_path: Path) -> None:
    proc, root = cgroup_tree(tmp_path, ["0::/job", "nonsense"], {"job/cpu.max": "lots 0"})
    assert usable_cpu_count(EIGHT_CPUS, proc, root) == 8


def test_the_default_without_arguments_is_this_process_share() -> None:
    """Whatever this machine is, the default never exceeds the CPUs the process may run on."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= usable_cpu_count() <= (allowed or 1)


def run_cli(*arguments: str, preexec_fn=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORA_MERGE, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,
    )


@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_threads_must_be_a_positive_whole_number(tmp_path: Path, threads: str) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    result = run_cli(str(base), str(adapter), str(tmp_path / "out"), "--threads", threads)
    assert result.returncode == 2, result.stderr
    assert "--threads" in result.stderr
    assert not (tmp_path / "out").exists()


def test_threads_below_one_are_refused_from_python_too(tmp_path: Path) -> None:
    from lora_merge import merge
    from lora_merge.errors import UsageError
    from lora_merge.options.settings import MergeOptions

    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    with pytest.raises(UsageError, match="--threads 0 must be a whole number of at least 1"):
        merge(MergeOptions(base, adapter, tmp_path / "out", threads=0))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_any_thread_count_writes_the_pinned_bytes(tmp_path: Path, threads: str) -> None:
    base, adapter, _ = build_case("llama-fp32-to-fp16-resharded", tmp_path)
    out = tmp_path / "merged"
    result = run_cli(
        str(base),
        str(adapter),
        str(out),
        "--dtype",
        "fp16",
        "--max-shard-size",
        "6KB",
        "--threads",
        threads,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert output_digests(out) == PINNED["llama-fp32-to-fp16-resharded"]
    summary = json.loads(result.stdout)
    assert summary["threads"] == int(threads)
    seconds = summary["seconds"]
    expected_rate = summary["bytes_written"] / 1e9 / seconds
    # The same two figures, but "seconds" is rounded to 1 ms (0.5 ms off at most: a
    # relative error of the rate of at most 0.0005 / (seconds - 0.0005)) and the rate to 6
    # decimals (5e-7 off at most). The two errors add, so the bound is their sum (pytest's
    # approx takes the larger of rel and abs, which a run near both limits exceeds).
    seconds_error = 0.0005 / (seconds - 0.0005) * expected_rate
    assert abs(summary["gb_per_second"] - expected_rate) <= seconds_error + 5e-7 + 1e-12


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_run_pinned_to_one_cpu_merges_on_one_thread(tmp_path: Path) -> None:
    """As under ``taskset -c N`` or a Slurm job given one CPU of a big node."""
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    one_cpu = {min(os.sched_getaffinity(0))}
    result = run_cli(
        str(base),
        str(adapter),
        str(tmp_path / "out"),
        "--dry-run",
        "--json",
        preexec_fn=lambda: os.sched_setaffinity(0, one_cpu),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["threads"] == 1
