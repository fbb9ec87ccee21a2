"""Ctrl-C and SIGTERM mid-write leave no OUT and no temporary files, with exit 130 / 143.

A real subprocess gets a real signal while it is writing. To hit it mid-write
deterministically the test freezes the process (SIGSTOP) as soon as its staging
folder appears, queues the signal, and lets it continue (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from handmade_checkpoints import write_big_base_and_adapter

LORA_MERGE = str(Path(sys.executable).parent / "lora-merge")


@pytest.fixture(scope="module")
def big_enough_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A ~100 MB float32 base and an adapter on one of its tensors."""
    return write_big_base_and_adapter(tmp_path_factory.mktemp("interrupt"))


def _wait_for_staging(parent: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(".merged.lora-merge-partial-") for p in parent.iterdir()):
            return
        if process.poll() is not None:
            pytest.fail(f"lora-merge ended before writing started: {process.communicate()}")
        time.sleep(0.001)
    pytest.fail("lora-merge never started writing")


@pytest.mark.parametrize(
    ("sent", "exit_code", "name"),
    [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")],
)
def test_signal_mid_write_removes_partial_output(
    big_enough_inputs, tmp_path, sent, exit_code, name
):
    """The staging folder is deleted, OUT never appears, the exit code says which signal."""
    base, adapter = big_enough_inputs
    out = tmp_path / "merged"
    process = subprocess.Popen(
        [LORA_MERGE, str(base), str(adapter), str(out), "--dtype", "bf16", "--max-memory", "2MB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_staging(tmp_path, process)
    os.kill(process.pid, signal.SIGSTOP)
    assert not out.exists(), (
        "the merge finished before it could be interrupted; make the input larger"
    )
    os.kill(process.pid, sent)
    os.kill(process.pid, signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == exit_code, stderr
    assert stderr.strip().splitlines() == [
        f"lora-merge: error: interrupted by {name}; no output was written"
    ]
    assert stdout == ""
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next(big_enough_inputs, tmp_path):
    """SIGKILL cannot be handled; the next run with the same OUT removes the dead run's staging folder."""
    base, adapter = big_enough_inputs
    out = tmp_path / "merged"
    process = subprocess.Popen(
        [LORA_MERGE, str(base), str(adapter), str(out), "--dtype", "bf16", "--max-memory", "2MB"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_staging(tmp_path, process)
    process.kill()
    process.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.lora-merge-partial-")]
    assert leftovers and not out.exists()

    rerun = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(out), "--quiet"], capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
