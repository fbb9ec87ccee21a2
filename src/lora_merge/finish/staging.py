"""Build OUT in a hidden sibling folder and rename it into place only when complete.

An interrupted run (an error, Ctrl-C, SIGTERM) removes its staging folder, so it
never leaves a half-written OUT. A run killed with SIGKILL cannot clean up; its
staging folder has a recognisable name with the dead process's id, and the next
run removes it, unless that run resumes it.

Resumable runs (``--resume``) keep a journal in the staging folder: after each
shard is complete and flushed to disk, its name, size and sha256 are recorded
with a fingerprint of the whole merge plan. A later ``--resume`` run of the
same merge adopts the dead run's folder, keeps every journaled shard whose
checksum still matches, and writes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from lora_merge.errors import InvalidInputError, OutputError
from lora_merge.io.hashing import sha256_of
from lora_merge.io.json_files import read_json_object
from lora_merge.io.positional import flush_to_disk
from lora_merge.io.shard_writer import write_errors_as_output_errors

STAGING_MARKER = ".lora-merge-partial-"
JOURNAL_NAME = ".lora-merge-journal.json"


# A staging name must fit in one path component (255 bytes on every common
# filesystem) beside the marker, the pid and the token.
_MAX_NAME_BYTES_IN_STAGING = 160


def staging_name(out: Path, pid: int, token: str) -> str:
    """``.OUTNAME.lora-merge-partial-PID-TOKEN``: hidden, recognisable, unique."""
    return f"{_staging_prefix(out)}{pid}-{token}"


def _staging_prefix(out: Path) -> str:
    """``.OUTNAME.lora-merge-partial-``, with a very long OUT name shortened (and hashed)."""
    name = out.name
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES_IN_STAGING:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        name = f"{name[:40]}~{digest}"
    return f".{name}{STAGING_MARKER}"


class StagingFolder:
    """A temporary sibling of OUT that becomes OUT on :meth:`commit`.

    Use as a context manager; leaving the block without committing deletes it.

    Args:
        out: the final folder.
        fingerprint: for a resumable run, a digest of everything that decides the
            output bytes; None for a plain run.
    """

    def __init__(self, out: Path, fingerprint: str | None = None) -> None:
        self.out = out
        self.path = out.parent / staging_name(out, os.getpid(), uuid.uuid4().hex[:8])
        self.fingerprint = fingerprint
        self.resumed_from: Path | None = None
        self._journal: dict[str, dict[str, object]] = {}
        self._committed = False

    def __enter__(self) -> StagingFolder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.fingerprint is not None:
                self._adopt_resumable_folder()
            remove_stale_staging_folders(self.out)
            if self.resumed_from is None:
                self.path.mkdir()
            return self
        except BaseException:
            # A signal can land between mkdir and the with-block taking over.
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def has_verified_shard(self, file_name: str) -> bool:
        """True when a resumed journal lists ``file_name`` and the file still matches it.

        A listed file that no longer matches (size or sha256) is deleted, to be rewritten.
        """
        recorded = self._journal.get(file_name)
        path = self.path / file_name
        if recorded is None or not path.is_file():
            return False
        if path.stat().st_size == recorded.get("size") and sha256_of(path) == recorded.get(
            "sha256"
        ):
            return True
        path.unlink()
        del self._journal[file_name]
        return False

    def record_shard(self, file_name: str) -> None:
        """Journal a finished shard (resumable runs only): flush it, hash it, record it."""
        if self.fingerprint is None:
            return
        path = self.path / file_name
        flush_to_disk(path)
        self._journal[file_name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        journal = {"fingerprint": self.fingerprint, "shards": self._journal}
        temporary = self.path / f"{JOURNAL_NAME}.tmp"
        temporary.write_text(json.dumps(journal, indent=1, sort_keys=True), encoding="utf-8")
        flush_to_disk(temporary)
        os.replace(temporary, self.path / JOURNAL_NAME)
        flush_to_disk(self.path)

    def _adopt_resumable_folder(self) -> None:
        """Claim the newest dead run's folder whose journal has our fingerprint."""
        candidates = sorted(
            _dead_staging_folders(self.out), key=lambda p: p.stat().st_mtime, reverse=True
        )
        for candidate in candidates:
            journal = _read_journal(candidate / JOURNAL_NAME)
            if journal is None or journal.get("fingerprint") != self.fingerprint:
                continue
            try:
                os.rename(candidate, self.path)  # atomic: a concurrent run cannot claim it too
            except OSError:
                continue
            shards = journal.get("shards")
            self._journal = dict(shards) if isinstance(shards, dict) else {}
            self.resumed_from = candidate
            return

    def commit(self) -> None:
        """Move the finished folder to OUT, replacing an existing OUT (checked earlier).

        Every file is flushed to disk first (``fsync``), then the folder: a
        rename can reach the disk before the data it names, and after a power
        cut OUT would exist with empty or torn shards. Ctrl-C and SIGTERM are
        held back while the renames run (see :func:`signals_deferred`), so an
        existing OUT is never moved aside without the new one taking its place.
        """
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        # Delayed allocation means a full disk can first show up here.
        with write_errors_as_output_errors(self.path):
            for path in sorted(self.path.iterdir()):
                flush_to_disk(path)
            flush_to_disk(self.path)
        previous = None
        with signals_deferred(), renames_as_output_errors(self.out):
            if self.out.exists():
                previous = self.out.parent / staging_name(self.out, os.getpid(), "replaced")
                os.rename(self.out, previous)
            os.rename(self.path, self.out)
            self._committed = True
        flush_to_disk(self.out.parent)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def remove_stale_staging_folders(out: Path) -> list[Path]:
    """Delete staging folders of OUT left by runs whose process no longer exists."""
    removed = []
    for candidate in _dead_staging_folders(out):
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _dead_staging_folders(out: Path) -> list[Path]:
    # Names are compared without case: on the case-insensitive filesystems of
    # macOS and Windows, OUT "Merged" and "merged" are one folder. Where case
    # matters, the worst a match across cases can do is clean up a dead run's
    # folder of another OUT; resuming one takes a journal of the same plan.
    prefix = _staging_prefix(out).casefold()
    found = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    for candidate in siblings:
        name = candidate.name.casefold()
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)) and candidate.is_dir():
            found.append(candidate)
    return found


def _read_journal(path: Path) -> dict[str, object] | None:
    """A dead run's journal, or None when it is missing or damaged (its folder is not resumed)."""
    try:
        return read_json_object(path)
    except InvalidInputError:
        return None


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


@contextmanager
def renames_as_output_errors(out: Path) -> Iterator[None]:
    """Turn a refused rename into the user-facing OutputError.

    On Windows a folder cannot be renamed while another program holds a file in
    it open (an editor, a file browser preview, a running server).
    """
    try:
        yield
    except OSError as err:
        raise OutputError(
            f"could not move the finished output into place at {out}: "
            f"{err.strerror or err}; if a file in {out.name} is open in another program, "
            "close it and run again"
        ) from err
