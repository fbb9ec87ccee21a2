"""Keep the hashing of BASE's shards within a bounded lead over the merge's reads.

The model card records the sha256 of every input file. Hashed on its own, a
file is read once by the hasher and once by the merge; that costs nothing while
the model fits in the page cache (the second read finds the pages there), but on
a model bigger than the memory left for the cache (a 671B model on a 16 GB CI
runner) every byte is read from the disk twice. So the hasher follows the merge:
the shards are hashed in the order the merge reads them, and the bytes hashed
that the merge has not read yet never exceed a lead derived from the memory the
page cache may use (:func:`hashing_lead_bytes`): small where the model does not
fit there, large where it does.

What counts is how many bytes of a file the merge has read (each once), not how
far into it: the copies of untouched tensors made while torch imports
(run/copy_ahead.py) read a few small tensors (norms) near the end of each file
long before the stream gets there, and a file's furthest read would let the
hasher run through the whole model (measured at 1.1B in a 1 GB cgroup: 2.1 GB
read from the disk twice). The stream reads each file's tensors in the order
they are stored, so the count follows its position; a file's header and tensors
no output needs are never counted, and only hold the hasher back. The copies
also count the few tensors they skip between two copies (no more than the lead),
which the stream reads next.

The merge never waits for the hasher: its readers only report how far they have
read each file (:meth:`ReadPacing.reads_of`). The hasher waits for them, until
:meth:`ReadPacing.release` (the merge has read all it reads, or the run stops).
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

PROC_MEMINFO = Path("/proc/meminfo")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where the shards fit in the page cache's room, the share of it that the hasher may fill
# ahead of the merge: it hashes as freely as it did unpaced (during ``import torch`` above
# all, on a core the import leaves idle), in the merge's order.
LEAD_SHARE = 4
# The lead where they do not fit: two of the hasher's windows (io/hashing.py maps 8 MiB at
# once). The output's pages on their way to the disk fill such a cache, and the kernel
# evicts the clean pages read ahead to make room: measured with a 7B merge (13.6 GB) in a
# 4 GiB memory cgroup, cold, the disk read 15.2 GB with this lead, 15.8 GB with 122 MiB,
# 18.4 GB with 325 MiB, 26.0 GB with 1 GiB and 26.3 GB unpaced (docs/benchmarks.md).
MIN_LEAD_BYTES = 16 * 2**20
# The room where the memory cannot be read (macOS, Windows): what a small machine spares.
DEFAULT_ROOM_BYTES = 4 * 2**30

FileIdentity = tuple[int, int]


def file_identity(status: os.stat_result) -> FileIdentity:
    """A file as device and inode: any path (or descriptor) that names it finds it."""
    return status.st_dev, status.st_ino


class ReadPacing:
    """How many bytes of each paced file the merge has read, and how far hashing may go in each.

    Thread-safe: the merge's readers report from their threads, the hasher's
    threads wait on it.

    Args:
        lead_bytes: the most bytes of the paced files hashed beyond those the merge has read.
        paced: the files whose hashing follows the merge (BASE's shards); any other file
            is hashed without waiting.
    """

    def __init__(self, lead_bytes: int, paced: Iterable[Path]) -> None:
        self.lead_bytes = max(MIN_LEAD_BYTES, lead_bytes)
        self._read: dict[FileIdentity, ByteRanges] = {}
        self._hashed: dict[FileIdentity, int] = {}
        for path in paced:
            try:
                identity = file_identity(os.stat(path))
            except OSError:
                continue  # the run itself will say what is wrong with it
            self._read[identity] = ByteRanges()
            self._hashed[identity] = 0
        self._released = False
        self._changed = threading.Condition()

    def reads_of(self, descriptor: int) -> Callable[[int, int], None]:
        """What a reader of the open file calls with the start and size of each byte range
        it reads (a read-ahead hint does not count); a no-op for a file not paced."""
        identity = file_identity(os.fstat(descriptor))
        if identity not in self._read:
            return _ignore
        return lambda start, nbytes: self._advance(identity, start, nbytes)

    def wait_to_hash(self, identity: FileIdentity, end: int, stop: threading.Event) -> None:
        """Return once bytes up to ``end`` of the file may be hashed (the hasher's threads).

        That is when the bytes hashed beyond those the merge has read, of every paced
        file and these included, stay within the lead; at once for a file not paced, after :meth:`release`, or once
        ``stop`` is set (the caller checks it).
        """
        if identity not in self._hashed:
            return
        with self._changed:
            while not (self._released or stop.is_set()):
                others = sum(
                    max(0, hashed - self._read[other].total)
                    for other, hashed in self._hashed.items()
                    if other != identity
                )
                if others + max(0, end - self._read[identity].total) <= self.lead_bytes:
                    break
                # A timeout too: a stop set without a notification is seen within it.
                self._changed.wait(timeout=0.1)
            self._hashed[identity] = max(self._hashed[identity], end)

    def release(self) -> None:
        """Let hashing run freely from now on: the merge has read what it reads, or stops."""
        with self._changed:
            self._released = True
            self._changed.notify_all()

    def _advance(self, identity: FileIdentity, start: int, nbytes: int) -> None:
        with self._changed:
            self._read[identity].add(start, start + nbytes)
            self._changed.notify_all()


class ByteRanges:
    """Byte ranges of a file, merged where they meet; ``total`` counts each byte once.

    The merge's readers mostly extend the range they read last, so the list stays short.
    """

    def __init__(self) -> None:
        self.total = 0
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        """Add bytes ``start:end``."""
        if end <= start:
            return
        # The ranges that overlap or touch start:end, merged into one.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
            self.total -= sum(
                e - s for s, e in zip(self._starts[first:last], self._ends[first:last], strict=True)
            )
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]
        self.total += end - start


def _ignore(start: int, nbytes: int) -> None:
    """Reads of a file that is not paced: nothing to record."""


def hashing_lead_bytes(
    paced_bytes: int,
    meminfo: Path = PROC_MEMINFO,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    cgroup_root: Path = CGROUP_ROOT,
) -> int:
    """The lead that hashing may take over the merge's reads of ``paced_bytes`` of shards.

    A share (:data:`LEAD_SHARE`) of the page cache's room where the shards fit in it,
    else :data:`MIN_LEAD_BYTES`. The room is the smaller of the machine's
    ``MemAvailable`` (which counts the page cache as available) and, for this
    process's memory cgroup and each one above it, its limit less the anonymous
    memory charged to it (page cache is charged to the cgroup that reads it, and
    reclaimed from there once the limit is reached); :data:`DEFAULT_ROOM_BYTES` where
    none of that can be read.
    """
    rooms = [room for room in (_mem_available(meminfo),) if room is not None]
    rooms += _cgroup_rooms(proc_self_cgroup, cgroup_root)
    room = min(rooms, default=DEFAULT_ROOM_BYTES)
    if paced_bytes > room:
        return MIN_LEAD_BYTES
    return max(MIN_LEAD_BYTES, room // LEAD_SHARE)


def _mem_available(meminfo: Path) -> int | None:
    try:
        lines = meminfo.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        fields = value.split()
        if name == "MemAvailable" and fields and fields[0].isdigit():
            return int(fields[0]) * 1024  # in kB
    return None


def _cgroup_rooms(proc_self_cgroup: Path, cgroup_root: Path) -> list[int]:
    """Each memory cgroup's limit less its anonymous memory, from this process's up."""
    try:
        lines = proc_self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rooms: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            rooms += _rooms_up_the_tree(cgroup_root, path, "memory.max", ("anon",))
        elif "memory" in controllers.split(","):  # cgroup v1
            rooms += _rooms_up_the_tree(
                cgroup_root / "memory", path, "memory.limit_in_bytes", ("total_rss", "rss")
            )
    return rooms


def _rooms_up_the_tree(
    mount: Path, path: str, limit_file: str, anon_keys: tuple[str, ...]
) -> list[int]:
    """The room of the cgroup at ``path`` under ``mount`` and of each cgroup above it that
    exists (inside a container, the process's own path may not)."""
    folder = mount.joinpath(*[part for part in path.split("/") if part not in ("", ".", "..")])
    rooms = []
    while True:
        limit = _read_int(folder / limit_file)
        # "max" (v2) or a number near 2**63 (v1): no limit.
        if limit is not None and limit < 2**60:
            rooms.append(max(0, limit - _anonymous_bytes(folder / "memory.stat", anon_keys)))
        if folder == mount or mount not in folder.parents:
            return rooms
        folder = folder.parent


def _anonymous_bytes(stat: Path, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` found in a cgroup's ``memory.stat`` (0 where none is)."""
    try:
        lines = stat.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    values = dict(line.split(maxsplit=1) for line in lines if len(line.split()) == 2)
    for key in keys:
        if values.get(key, "").isdigit():
            return int(values[key])
    return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
