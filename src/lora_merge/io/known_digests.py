"""sha256 digests of input files that are known without reading the files.

The model card records the sha256 of every input file, and at about 1.5 GB/s
per core that is the largest single CPU cost of a large merge (9-12 CPU-s of
about 33 for a 7B model). Three places may know a file's digest already; a file
that none of them knows is hashed, and its digest stored in the third:

- huggingface_hub's cache names each blob by its etag, which for a file stored
  with Git LFS (every weights file) is the sha256 of its content.
- A folder made by ``hf download REPO --local-dir DIR`` keeps, for each file,
  ``DIR/.cache/huggingface/download/<path>.metadata``: the commit, the etag and
  the time the record was written. huggingface_hub trusts the record while the
  file is not newer than it (``read_download_metadata`` in its
  ``_local_folder.py``); :func:`hub_local_dir_sha256` does the same. It reads the
  record itself: huggingface_hub's reader creates lock files and deletes a record
  it cannot parse, and a merge never writes into its inputs.
- :class:`DigestCache`: the digests this user's earlier runs computed, keyed by
  the file's stat, in one small JSON file of a per-user cache folder. A user who
  merges checkpoint-500, checkpoint-1000... into the same base hashes it once.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

# ``LORA_MERGE_CACHE``: the folder of the digest cache, or ``off``.
CACHE_ENV = "LORA_MERGE_CACHE"
CACHE_OFF = "off"
CACHE_FILE_NAME = "sha256-by-stat.json"
CACHE_FORMAT = 1
# Entries kept, the most recently used first: about 250 bytes each, so well under a
# megabyte, read whole at each run.
MAX_CACHE_ENTRIES = 2048
# The coarsest timestamps of a common file system (FAT: 2 s). A digest is stored only for a
# file whose modification and change times are older than the hashing by more than this:
# a write during or after the hashing then always moves its ctime (git's "racy" rule).
TIMESTAMP_GRANULARITY_NS = 2 * 10**9

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Where huggingface_hub keeps a --local-dir download's records, below DIR.
_LOCAL_DIR_RECORDS = (".cache", "huggingface", "download")
_METADATA_SUFFIX = ".metadata"
_MAX_RECORD_BYTES = 4096

# What identifies a file's content for the cache: a write changes size, mtime or ctime, a
# replacement (a new file renamed over the old) changes the inode.
Stamp = tuple[int, int, int, int, int]


class CacheEntry(TypedDict):
    """One digest of the cache file, under the key ``"dev:ino:size:mtime_ns:ctime_ns"``."""

    path: str  # where it was found, to prune it once that path names another file or none
    sha256: str
    used: float  # time.time() of its last store or lookup: the least recently used go first


def known_sha256(path: Path, cache: DigestCache | None) -> str | None:
    """The file's hex sha256 if something already knows it, else None (then hash it).

    Args:
        path: an input file.
        cache: the digests of earlier runs; None when it is off (``LORA_MERGE_CACHE=off``),
            and then only huggingface_hub's blob names are taken: a ``--local-dir``
            record is trusted by the file's mtime, as the cache is by its stat, and a
            user who turns the cache off asks for every other file to be hashed.
    """
    known = hub_blob_sha256(path)
    if known is None and cache is not None:
        known = hub_local_dir_sha256(path) or cache.lookup(path)
    return known


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 that names the blob ``path`` links to in huggingface_hub's cache, if it does."""
    blob = Path(os.path.realpath(path))
    if blob.parent.name == "blobs" and _SHA256_HEX.fullmatch(blob.name):
        return blob.name
    return None


def hub_local_dir_sha256(path: Path) -> str | None:
    """The sha256 that ``hf download --local-dir`` recorded for ``path``, if it still holds.

    The record of the nearest folder above ``path`` that has one is used when its
    etag is a sha256 (a Git LFS file; a small file's etag is its git hash) and the
    file was not modified after the record was written. huggingface_hub allows a
    second of slack there; none is allowed here, so a file changed within the
    second after its download is hashed rather than trusted.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    file = Path(os.path.abspath(path))
    for local_dir in file.parents:
        record = local_dir.joinpath(*_LOCAL_DIR_RECORDS, *file.relative_to(local_dir).parts)
        record = record.with_name(record.name + _METADATA_SUFFIX)
        try:
            # Three short lines (commit, etag, time); a larger file is not one of them.
            with open(record, "rb") as handle:
                lines = handle.read(_MAX_RECORD_BYTES).decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        try:
            etag, written_at = lines[1].strip(), float(lines[2])
        except (IndexError, ValueError):
            return None  # huggingface_hub would not trust it either
        if _SHA256_HEX.fullmatch(etag) and status.st_mtime <= written_at:
            return etag
        return None
    return None


def digest_cache_folder(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The digest cache's folder: ``LORA_MERGE_CACHE``, else the platform's per-user cache.

    ``%LOCALAPPDATA%\\lora-merge`` on Windows, ``~/Library/Caches/lora-merge`` on
    macOS, ``$XDG_CACHE_HOME/lora-merge`` (``~/.cache/lora-merge``) elsewhere.
    None when ``LORA_MERGE_CACHE=off``.
    """
    chosen = environ.get(CACHE_ENV, "")
    if chosen.strip().lower() == CACHE_OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    if sys.platform == "win32":
        local = environ.get("LOCALAPPDATA")
        root = Path(local) if local else Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Caches"
    else:
        xdg = environ.get("XDG_CACHE_HOME", "")
        # The XDG spec: a relative path is invalid and is ignored.
        root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "lora-merge"


class DigestCache:
    """sha256 digests of files, keyed by ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``.

    As git's index does, a digest is stored only when the file's stat taken before
    it was hashed equals the one taken after, and the file's mtime and ctime are
    older than the start of the hashing by more than the file system's timestamp
    granularity: any later write then moves the ctime (which no program can set
    back), so the key no longer matches and the file is hashed again. A file
    written just before the run is not stored; the next run stores it.

    The cache is one JSON file, read once when opened and replaced whole (a
    temporary file, then ``os.replace``) by :meth:`save`. Two runs at once: the
    last to save wins, and the other's new entries are lost, which costs a hash.
    A missing, unreadable or corrupt file is an empty cache, and one that cannot be
    written is not written: the cache never fails a run. One instance is used by
    one thread.

    On Windows, Python's ``st_ctime`` is the creation time, not the change time: a
    file rewritten in place with the same size and its mtime set back is not seen
    to change there.
    """

    def __init__(self, file: Path, started_ns: int) -> None:
        """Read the cache in ``file``.

        Args:
            file: the cache's JSON file (need not exist).
            started_ns: ``time.time_ns()`` at or before the start of any hashing whose
                digests will be :meth:`remember`-ed.
        """
        self.file = file
        self._started_ns = started_ns
        self._entries = _read_entries(file)
        self._changed = False

    @classmethod
    def open(cls, started_ns: int, environ: Mapping[str, str] = os.environ) -> DigestCache | None:
        """The user's digest cache (see :func:`digest_cache_folder`), or None when it is off."""
        folder = digest_cache_folder(environ)
        return None if folder is None else cls(folder / CACHE_FILE_NAME, started_ns)

    def lookup(self, path: Path) -> str | None:
        """The digest stored for the file ``path`` is now, or None."""
        try:
            entry = self._entries.get(_key(_stamp(os.stat(path))))
        except OSError:
            return None
        if entry is None:
            return None
        entry["used"] = time.time()
        self._changed = True
        return entry["sha256"]

    def remember(self, path: Path, before: os.stat_result, sha256: str) -> None:
        """Store ``sha256``, computed for ``path`` after ``before`` was taken, if it is safe to.

        Args:
            path: the file hashed.
            before: its stat, taken before the hashing began.
            sha256: its hex digest.
        """
        try:
            after = os.stat(path)
        except OSError:
            return
        stamp = _stamp(after)
        newest = max(after.st_mtime_ns, after.st_ctime_ns)
        if (
            stamp != _stamp(before)
            or newest >= self._started_ns - TIMESTAMP_GRANULARITY_NS
            # An inode number of 0 (some FAT and network file systems) names no file.
            or after.st_ino == 0
        ):
            return
        self._entries[_key(stamp)] = CacheEntry(
            path=os.path.abspath(path), sha256=sha256, used=time.time()
        )
        self._changed = True

    def save(self) -> None:
        """Write the cache back if it changed: without the entries of files that no longer
        exist (or have changed), the most recently used :data:`MAX_CACHE_ENTRIES` at most."""
        if not self._changed:
            return
        live = [(key, entry) for key, entry in self._entries.items() if _still_there(key, entry)]
        live.sort(key=lambda item: item[1]["used"], reverse=True)
        document = {"format": CACHE_FORMAT, "entries": dict(live[:MAX_CACHE_ENTRIES])}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{self.file.name}.", suffix=".tmp", dir=self.file.parent
            )
        except OSError:
            return  # a read-only or missing home: run without the cache
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(document, handle, separators=(",", ":"))
            os.replace(temporary, self.file)
        except OSError:
            # Windows refuses to replace a file another process has open: this run's
            # entries are lost, as when another run saves last.
            Path(temporary).unlink(missing_ok=True)
        else:
            self._changed = False


def _stamp(status: os.stat_result) -> Stamp:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def _key(stamp: Stamp) -> str:
    return ":".join(str(part) for part in stamp)


def _read_entries(file: Path) -> dict[str, CacheEntry]:
    """The well-formed entries in ``file``; none if it is missing, unreadable or corrupt."""
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        entries = document["entries"] if document.get("format") == CACHE_FORMAT else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {
        key: CacheEntry(path=entry["path"], sha256=entry["sha256"], used=float(entry["used"]))
        for key, entry in entries.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and isinstance(entry.get("sha256"), str)
        and _SHA256_HEX.fullmatch(entry["sha256"])
        and isinstance(entry.get("used"), (int, float))
    }


def _still_there(key: str, entry: CacheEntry) -> bool:
    """Whether the file the entry was stored for still has the stat of its key."""
    try:
        return _key(_stamp(os.stat(entry["path"]))) == key
    except OSError:
        return False
