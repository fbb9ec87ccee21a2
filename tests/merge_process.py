"""Running the installed ``lora-merge`` as a user would, and catching it in the middle of writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LORA_MERGE = str(Path(sys.executable).parent / "lora-merge")
# Slow enough (every tensor converted, in small tiles) that a test can act mid-write.
BUSY_OPTIONS = ("--dtype", "bf16", "--max-memory", "2MB")


def start_merge_frozen_mid_write(
    base: Path, adapter: Path, out: Path, *options: str, timeout: float = 60.0
) -> subprocess.Popen[str]:
    """Start a merge and freeze it (SIGSTOP) as soon as its staging folder appears.

    The caller then acts on the frozen process (sends a signal, truncates an
    input, fills the disk...) and resumes it with SIGCONT, or kills it.
    """
    process = subprocess.Popen(
        [LORA_MERGE, str(base), str(adapter), str(out), *BUSY_OPTIONS, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prefix = f".{out.name}.lora-merge-partial-"
    deadline = time.monotonic() + timeout
    while not any(p.name.startswith(prefix) for p in out.parent.iterdir()):
        if process.poll() is not None:
            pytest.fail(f"lora-merge ended before writing started: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("lora-merge never started writing")
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGSTOP)
    assert not out.exists(), "the merge finished before it could be caught; make the input larger"
    return process


def resume(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGCONT a frozen merge and wait for it; return its stdout and stderr."""
    os.kill(process.pid, signal.SIGCONT)
    return process.communicate(timeout=60)
