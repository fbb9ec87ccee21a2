"""Running the installed ``lora-merge`` as a user would, and catching it in the middle of writing.

To act on a merge mid-write (send it a signal, truncate an input, fill the disk)
a test needs the process frozen at a known point. Polling from outside for a
file to appear is a race that a loaded machine loses (the merge can finish
between two polls), so the merge freezes itself instead: the command runs
through ``python -c`` with a small bootstrap that wraps one method of
lora-merge's writer (in that test process only; lora-merge has no such hook)
so that the process sends itself SIGSTOP right after the method's first call,
then calls the ``lora-merge`` console-script entry point exactly as the
installed command does. The test waits with ``waitpid(WUNTRACED)`` until the
kernel reports the process stopped. No timing is involved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

LORA_MERGE = str(Path(sys.executable).parent / "lora-merge")
# Small tiles and a dtype conversion: every tensor goes through the writer in many pieces, so
# the first piece written is far from the end of the merge.
BUSY_OPTIONS = ("--dtype", "bf16", "--max-memory", "2MB")

# Where a merge stops itself: after the first piece of tensor data reaches a shard (converted
# tiles go through write, untouched tensors through copy_from), or after a resumable run
# journals its first finished shard.
FIRST_TENSOR_WRITE = (
    "lora_merge.io.shard_writer:TensorSlot.write",
    "lora_merge.io.shard_writer:TensorSlot.copy_from",
)
FIRST_JOURNALED_SHARD = ("lora_merge.finish.staging:StagingFolder.record_shard",)

needs_sigstop = pytest.mark.skipif(
    sys.platform == "win32",
    reason="freezing a process mid-write needs SIGSTOP/SIGCONT and waitpid, which Windows lacks",
)

# argv[1]: comma-separated "module:Class.method" to wrap; argv[2:]: the command's arguments.
_STOP_ITSELF_BOOTSTRAP = """
import importlib, os, signal, sys, threading
from importlib.metadata import entry_points

# A shell starts a background job (`pytest ... &`, nohup, some CI runners) with SIGINT ignored,
# and Python then leaves Ctrl-C ignored in every process it starts. A user who presses Ctrl-C
# runs lora-merge in the foreground, where Python turns SIGINT into KeyboardInterrupt: put that
# back, so that what a test of Ctrl-C sees does not depend on how pytest itself was started.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

first_call = threading.Lock()  # several writer threads: exactly one of them stops the process

def stop_after_first_call(owner, name):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if first_call.acquire(blocking=False):
            os.kill(os.getpid(), signal.SIGSTOP)
        return result
    setattr(owner, name, wrapped)

for target in sys.argv[1].split(","):
    module_name, qualified_name = target.split(":")
    class_name, method_name = qualified_name.split(".")
    owner = getattr(importlib.import_module(module_name), class_name)
    stop_after_first_call(owner, method_name)
(command,) = entry_points(group="console_scripts", name="lora-merge")
sys.argv = ["lora-merge", *sys.argv[2:]]
sys.exit(command.load()())
"""


def start_merge_stopped_at(
    stop_points: tuple[str, ...], *arguments: object, **popen_options: object
) -> subprocess.Popen[str]:
    """Run ``lora-merge ARGUMENTS``; return once it has stopped itself after ``stop_points``.

    Fails the test (with the command's output) if the merge exits before reaching them.
    """
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _STOP_ITSELF_BOOTSTRAP,
            ",".join(stop_points),
            *map(str, arguments),
        ],
        text=True,
        **popen_options,  # type: ignore[call-overload]
    )
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        # It exited; hand Popen the status that waitpid consumed, then report its output.
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"lora-merge exited ({process.returncode}) before reaching {stop_points}:\n"
            f"{stdout or ''}{stderr or ''}"
        )
    return process


def start_merge_frozen_mid_write(
    base: Path, adapter: Path, out: Path, *options: str
) -> subprocess.Popen[str]:
    """Start a merge and return it stopped (SIGSTOP) right after it wrote its first tensor data.

    The caller then acts on the frozen process (sends a signal, truncates an
    input, fills the disk...) and resumes it with :func:`resume`, or kills it.
    """
    process = start_merge_stopped_at(
        FIRST_TENSOR_WRITE,
        base,
        adapter,
        out,
        *BUSY_OPTIONS,
        *options,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if out.exists():
        process.kill()
        process.communicate()
        pytest.fail("OUT exists although the merge was stopped mid-write")
    return process


def resume(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGCONT a frozen merge and wait for it; return its stdout and stderr."""
    os.kill(process.pid, signal.SIGCONT)
    return process.communicate(timeout=300)
