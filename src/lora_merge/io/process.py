"""Processes and signals, the same on Linux, macOS and Windows.

:func:`process_alive` tells whether a process id is still running (a dead run's
staging folder may be removed); :func:`signals_deferred` holds Ctrl-C and
SIGTERM back while a block that must not be cut short runs (the renames that
put OUT in place).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def process_alive(pid: int) -> bool:
    """True if a process with this id exists (ours or another user's)."""
    if sys.platform == "win32":
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: only checks; on Windows os.kill would terminate it
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    query_limited_information, still_active = 0x1000, 259
    access_denied = 5
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        # No such process (ERROR_INVALID_PARAMETER), unless it is another user's.
        return bool(ctypes.get_last_error() == access_denied)  # type: ignore[attr-defined,unused-ignore]
    try:
        exit_code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code)):
            return True
        return exit_code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the duration of the block, then drop them.

    Python runs signal handlers in the main thread only, between bytecodes: in
    the main thread, the handlers are swapped for one that only notes the
    signal, and the old ones are put back afterwards. The block finishes the
    merge, so a signal that arrived during it has nothing left to stop. In
    another thread the block cannot be interrupted by a handler at all. Works
    the same on Linux, macOS and Windows (where SIGBREAK, Ctrl-Break, is held
    too).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGBREAK"):
        held.append(signal.SIGBREAK)
    previous = {}
    for number in held:
        handler = signal.getsignal(number)
        if handler is not None:  # None: installed outside Python, cannot be put back
            previous[number] = handler
            signal.signal(number, _note_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """A handler that lets the signal pass: the work it would stop is finishing."""
