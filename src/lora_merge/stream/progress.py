"""The bar of bytes written, on stderr, with tqdm imported only when the bar is shown.

A run with ``--quiet``, or whose stderr is not a terminal, shows no bar and never
imports tqdm (about 0.1 s of start-up).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any


def progress_bar(
    total: int, show: bool
) -> tuple[AbstractContextManager[Any], Callable[[int], None]]:
    """A bar of ``total`` bytes on stderr, and the function that advances it.

    Args:
        total: the bytes the run will write.
        show: False gives a context that does nothing and a function that ignores its count.

    Returns:
        The bar, to be entered (leaving it closes the bar), and the function the stream's
        worker threads call with each count of bytes written.
    """
    if not show:
        return nullcontext(), _ignore_count
    from tqdm import tqdm

    class _ProgressBar(tqdm):
        """tqdm without its monitor thread.

        tqdm starts that thread in its constructor and swallows any Exception raised
        meanwhile: a SIGTERM handled there (the CLI's handler raises MergeInterrupted)
        would be lost, and the merge would go on to write OUT.
        """

        monitor_interval = 0

    progress = _ProgressBar(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        file=sys.stderr,
    )
    lock = threading.Lock()

    def on_bytes(count: int) -> None:  # called from the stream's worker threads
        with lock:
            progress.update(count)

    return progress, on_bytes


def _ignore_count(count: int) -> None:
    """What advances a bar that is not shown."""
