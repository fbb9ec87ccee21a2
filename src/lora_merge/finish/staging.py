"""Build OUT in a hidden sibling folder and rename it into place only when complete.

An interrupted run (an error, Ctrl-C, SIGTERM) removes its staging folder, so it
never leaves a half-written OUT. A run killed with SIGKILL cannot clean up; its
staging folder has a recognisable name with the dead process's id, and the next
run removes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

STAGING_MARKER = ".lora-merge-partial-"


def staging_name(out: Path, pid: int, token: str) -> str:
    """``.OUTNAME.lora-merge-partial-PID-TOKEN``: hidden, recognisable, unique."""
    return f".{out.name}{STAGING_MARKER}{pid}-{token}"


class StagingFolder:
    """A temporary sibling of OUT that becomes OUT on :meth:`commit`.

    Use as a context manager; leaving the block without committing deletes it.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / staging_name(out, os.getpid(), uuid.uuid4().hex[:8])
        self._committed = False

    def __enter__(self) -> StagingFolder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging_folders(self.out)
        try:
            self.path.mkdir()
            return self
        except BaseException:
            # A signal can land between mkdir and the with-block taking over.
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Move the finished folder to OUT, replacing an existing OUT (checked earlier).

        Every file is flushed to disk first (``fsync``), then the folder: a
        rename can reach the disk before the data it names, and after a power
        cut OUT would exist with empty or torn shards. SIGINT and SIGTERM are
        held back while the renames run, so an existing OUT is never moved aside
        without the new one taking its place.
        """
        for path in sorted(self.path.iterdir()):
            _fsync(path)
        _fsync(self.path)
        previous = None
        held = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            if self.out.exists():
                previous = self.out.parent / staging_name(self.out, os.getpid(), "replaced")
                os.rename(self.out, previous)
            os.rename(self.path, self.out)
            self._committed = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _fsync(self.out.parent)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def remove_stale_staging_folders(out: Path) -> list[Path]:
    """Delete staging folders of OUT left by runs whose process no longer exists."""
    removed = []
    prefix = f".{out.name}{STAGING_MARKER}"
    for candidate in out.parent.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)) and candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
