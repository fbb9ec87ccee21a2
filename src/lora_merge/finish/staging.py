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

import json
import os
import shutil
import signal
import uuid
from pathlib import Path

from lora_merge.io.hashing import sha256_of
from lora_merge.io.shard_writer import write_errors_as_output_errors

STAGING_MARKER = ".lora-merge-partial-"
JOURNAL_NAME = ".lora-merge-journal.json"


def staging_name(out: Path, pid: int, token: str) -> str:
    """``.OUTNAME.lora-merge-partial-PID-TOKEN``: hidden, recognisable, unique."""
    return f".{out.name}{STAGING_MARKER}{pid}-{token}"


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
        _fsync(path)
        self._journal[file_name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        journal = {"fingerprint": self.fingerprint, "shards": self._journal}
        temporary = self.path / f"{JOURNAL_NAME}.tmp"
        temporary.write_text(json.dumps(journal, indent=1, sort_keys=True))
        _fsync(temporary)
        os.replace(temporary, self.path / JOURNAL_NAME)
        _fsync(self.path)

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
        cut OUT would exist with empty or torn shards. SIGINT and SIGTERM are
        held back while the renames run, so an existing OUT is never moved aside
        without the new one taking its place.
        """
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        # Delayed allocation means a full disk can first show up here.
        with write_errors_as_output_errors(self.path):
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
            while signal.sigtimedwait(held, 0) is not None:
                pass  # consume SIGINT/SIGTERM that arrived during the renames
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _fsync(self.out.parent)
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
    prefix = f".{out.name}{STAGING_MARKER}"
    found = []
    for candidate in out.parent.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)) and candidate.is_dir():
            found.append(candidate)
    return found


def _read_journal(path: Path) -> dict[str, object] | None:
    try:
        journal = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) else None


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
