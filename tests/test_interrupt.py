"""Ctrl-C and SIGTERM mid-write leave no OUT and no temporary files, with exit 130 / 143.

A real subprocess gets a real signal while it is writing. To hit it mid-write
deterministically the merge stops itself (SIGSTOP) right after its first tensor
data reaches the output (see merge_process.py); the test queues the signal and
lets it continue (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from handmade_checkpoints import write_big_base_and_adapter
from merge_process import LORA_MERGE, needs_sigstop, resume, start_merge_frozen_mid_write

pytestmark = needs_sigstop


@pytest.fixture(scope="module")
def big_enough_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A ~32 MB float32 base of 8 tensors, each converted in several tiles: a merge stopped
    after its first write has most of its work ahead of it."""
    return write_big_base_and_adapter(tmp_path_factory.mktemp("interrupt"), tensors=8)


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
    process = start_merge_frozen_mid_write(base, adapter, out)
    os.kill(process.pid, sent)
    stdout, stderr = resume(process)

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
    process = start_merge_frozen_mid_write(base, adapter, out)
    process.kill()
    process.communicate()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.lora-merge-partial-")]
    assert leftovers and not out.exists()

    rerun = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(out), "--quiet"], capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_making_the_progress_bar_never_swallows_a_sigterm(tmp_path):
    """tqdm's constructor swallows any Exception raised while it starts its monitor thread;
    a SIGTERM handled there must still stop the merge (exit 143, no OUT)."""
    base, adapter = write_big_base_and_adapter(tmp_path / "inputs", tensors=2, side=64)
    hook = tmp_path / "hook"
    hook.mkdir()
    # Sends the signal at the one point where tqdm would swallow the handler's exception.
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "import tqdm.std\n"
        "original = tqdm.std.TMonitor.__init__\n"
        "def signalled(self, *args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    original(self, *args)\n"
        "tqdm.std.TMonitor.__init__ = signalled\n"
    )
    out = tmp_path / "merged"
    result = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(out), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(hook)},
    )
    # Either no monitor thread starts (nothing is signalled) or the signal stops the merge.
    if result.returncode == 0:
        assert "TqdmMonitorWarning" not in result.stderr, result.stderr
    else:
        assert result.returncode == 143, result.stderr
        assert not out.exists()
