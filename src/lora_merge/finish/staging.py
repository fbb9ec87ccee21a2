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

A part of a merge split over several processes (``--part I/N``, see
:mod:`lora_merge.finish.parts`) stages into the area all parts share instead,
with a journal of its own; the final ``--resume`` run claims that area.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_merge.errors import OutputError
from lora_merge.finish.parts import (
    journal_files,
    journal_name_of,
    part_of_journal,
    parts_area,
    read_journal,
    refuse_other_plans,
    temporary_name_of,
)
from lora_merge.io.hashing import sha256_of
from lora_merge.io.positional import flush_to_disk, write_errors_as_output_errors
from lora_merge.io.process import process_alive, signals_deferred
from lora_merge.options.values import Part

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
        fingerprint: for a resumable run or a part, a digest of everything that
            decides the output bytes; None for a plain run.
        part: for ``--part I/N``, which part this run is: it stages into the area
            all parts share, never commits, and keeps its shards when it ends.
        keep_verified: for a part, keep the shards its own earlier run journaled
            (``--resume``) instead of writing them again.
        path: for a plain run, a staging folder of OUT this process made already (the
            copies started before torch, :mod:`lora_merge.run.copy_ahead`), taken over.

    Attributes:
        notes: what the run should tell the user (part journals of another plan, rejected).
        from_parts: True when this run claimed the parts' shared area.
    """

    def __init__(
        self,
        out: Path,
        fingerprint: str | None = None,
        part: Part | None = None,
        keep_verified: bool = False,
        path: Path | None = None,
    ) -> None:
        self.out = out
        self.part = part
        self._taken_over = path is not None and part is None and fingerprint is None
        if path is not None and self._taken_over:
            self.path = path
        elif part is None:
            self.path = out.parent / staging_name(out, os.getpid(), uuid.uuid4().hex[:8])
        else:
            self.path = parts_area(_staging_prefix(out), out)
        self.fingerprint = fingerprint
        self.resumed_from: Path | None = None
        self.notes: list[str] = []
        self.from_parts = False
        self._keep_verified = keep_verified
        self._journal: dict[str, dict[str, object]] = {}
        self._committed = False

    def __enter__(self) -> StagingFolder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.part is not None:
            self._enter_parts_area(self.part)
            return self
        try:
            if self.fingerprint is not None:
                self._adopt_resumable_folder()
            elif parts_area(_staging_prefix(self.out), self.out).is_dir():
                self.notes.append(
                    f"{self.out.name}'s parts (--part) wrote shards beside it; this run without "
                    "--resume computes every shard itself and leaves them there"
                )
            remove_stale_staging_folders(self.out)
            if self.resumed_from is None:
                self.path.mkdir(exist_ok=self._taken_over)
            return self
        except BaseException:
            # A signal can land between mkdir and the with-block taking over.
            self._discard()
            raise

    def __exit__(self, *exc_info: object) -> None:
        if self.part is not None:
            # The area is every part's: remove only this part's unfinished files.
            for path in self.path.glob(temporary_name_of(self.part, "*")):
                path.unlink(missing_ok=True)
            return
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        """Remove the unfinished folder; a final step puts the parts' area back instead.

        The area goes back with the final step's journal in it (every shard kept
        so far), for the next final step. If it cannot (a part has made a new
        area meanwhile), the folder stays as a dead run's, for ``--resume`` to adopt.
        """
        if not self.from_parts:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            os.rename(self.path, parts_area(_staging_prefix(self.out), self.out))

    def _enter_parts_area(self, part: Part) -> None:
        """Join the shared area as ``part``: refuse another plan's area, read our own journal."""
        assert self.fingerprint is not None, "a part always journals its shards"
        refuse_other_plans(self.path, self.fingerprint)
        remove_stale_staging_folders(self.out)
        self.path.mkdir(exist_ok=True)
        if self._keep_verified:
            journal = read_journal(self.path / journal_name_of(part))
            shards = journal.get("shards") if journal else None
            self._journal = dict(shards) if isinstance(shards, dict) else {}

    def leave_parts_area(self) -> None:
        """A part whose shards all went to the Hub (``--low-disk``): drop its journal, and the
        area too when no other part has files there."""
        if self.part is None:
            return
        (self.path / journal_name_of(self.part)).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only when empty

    def shard_path(self, file_name: str) -> Path:
        """Where to write ``file_name``: in place, or under a part's temporary name."""
        if self.part is None:
            return self.path / file_name
        return self.path / temporary_name_of(self.part, file_name)

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
        """Journal a finished shard (resumable runs and parts): flush it, hash it, record it.

        A part's shard is renamed from its temporary name first.
        """
        if self.fingerprint is None:
            return
        written = self.shard_path(file_name)
        flush_to_disk(written)
        entry = {"size": written.stat().st_size, "sha256": sha256_of(written)}
        if written.name != file_name:
            os.replace(written, self.path / file_name)
        self._journal[file_name] = entry
        self._write_journal()

    def _write_journal(self) -> None:
        """Replace the journal atomically (write, flush, rename): a reader sees old or new."""
        journal: dict[str, object] = {"fingerprint": self.fingerprint, "shards": self._journal}
        name = JOURNAL_NAME if self.part is None else journal_name_of(self.part)
        if self.part is not None:
            journal["part"] = str(self.part)
        temporary = self.path / f"{name}.tmp"
        temporary.write_text(json.dumps(journal, indent=1, sort_keys=True), encoding="utf-8")
        flush_to_disk(temporary)
        os.replace(temporary, self.path / name)
        flush_to_disk(self.path)

    def _adopt_resumable_folder(self) -> None:
        """Claim the parts' shared area, or else the newest dead run's folder of our plan."""
        if self._claim_parts_area():
            return
        candidates = sorted(
            _dead_staging_folders(self.out), key=lambda p: p.stat().st_mtime, reverse=True
        )
        for candidate in candidates:
            journal = read_journal(candidate / JOURNAL_NAME)
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

    def _claim_parts_area(self) -> bool:
        """Take the parts' area over (the final step of ``--part`` runs); False if there is none.

        The area is renamed to this run's staging folder (atomic: a second final
        step cannot claim it too). Every journal of our plan is merged into this
        run's own journal; a journal of another plan is rejected with a note.
        Every file no kept journal lists (rejected shards, a part's unfinished
        files, the part journals) is deleted, so OUT holds only this plan's files.
        """
        area = parts_area(_staging_prefix(self.out), self.out)
        try:
            os.rename(area, self.path)
        except OSError:
            return False
        self.resumed_from = area
        self.from_parts = True
        for path in journal_files(self.path):
            journal = read_journal(path)
            shards = journal.get("shards") if journal else None
            if journal is None or journal.get("fingerprint") != self.fingerprint:
                count = len(shards) if isinstance(shards, dict) else 0
                self.notes.append(
                    f"{part_of_journal(path)}'s {count} shard(s) in {area.name} belong to "
                    "another merge (other options, inputs or lora-merge version): "
                    "rejected, computed again here"
                )
            elif isinstance(shards, dict):
                self._journal.update(shards)
        for path in self.path.iterdir():
            if path.name in self._journal:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self._write_journal()
        return True

    def commit(self) -> None:
        """Move the finished folder to OUT, replacing an existing OUT (checked earlier).

        Every file is flushed to disk first (``fsync``), then the folder: a
        rename can reach the disk before the data it names, and after a power
        cut OUT would exist with empty or torn shards. Ctrl-C and SIGTERM are
        held back while the renames run (see :func:`signals_deferred`), so an
        existing OUT is never moved aside without the new one taking its place.
        """
        for journal in journal_files(self.path):
            journal.unlink()
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
