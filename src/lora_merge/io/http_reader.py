"""Read tensors from safetensors files on the Hugging Face Hub by HTTP range requests.

``--low-disk`` reads the base where it lies: each row range the stream asks for is
one ranged ``GET`` of a ``resolve`` URL, and an untouched tensor is copied into the
output shard in bounded pieces. No base shard is ever stored whole, on disk or in
memory. Requests go through huggingface_hub's own HTTP session
(:func:`huggingface_hub.utils.get_session`: proxies, the user's client factory) with
its headers (:func:`huggingface_hub.utils.build_hf_headers`: HF_TOKEN, the user
agent), and follow the Hub's redirects to its CDN. A request that fails on the way
(a dropped connection, a 5xx, a 429) is retried with exponential backoff from the
first byte it did not get.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_merge.errors import InputNotFoundError, InvalidInputError
from lora_merge.io.positional import COPY_CHUNK_BYTES, PositionalFile
from lora_merge.io.reader import EntryReader
from lora_merge.io.safetensors_format import TensorEntry

try:
    from httpx2 import HTTPError as _HttpError
except ImportError:  # pragma: no cover - huggingface_hub < 1.0 spoke requests
    _HttpError = OSError  # type: ignore[assignment,misc]

# A read smaller than this fetches this much of its tensor (never past the tensor's end)
# and keeps it for the thread's next read: the stream reads a tensor tile by tile in one
# thread, and a round trip per small tile would cost more than the bytes.
READ_AHEAD_BYTES = 16 * 2**20
# Statuses worth another try: rate limits and the server's own failures.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteFile:
    """One file on the Hub.

    Attributes:
        url: its ``resolve`` URL, pinned to a commit.
        size: its size in bytes.
        sha256: its sha256 (the Hub's LFS object id), or None when the Hub did not say.
    """

    url: str
    size: int
    sha256: str | None = None


class RangeFetcher:
    """Ranged GETs through huggingface_hub's session, retried with backoff.

    Args:
        max_retries: tries after the first one, per request.
        base_wait: seconds before the first retry; doubled each time, at most ``max_wait``.
        max_wait: the longest wait between tries.
    """

    def __init__(self, max_retries: int = 6, base_wait: float = 0.5, max_wait: float = 8.0) -> None:
        self.max_retries = max_retries
        self.base_wait = base_wait
        self.max_wait = max_wait
        self.retries = 0  # how many requests were retried, for tests and reports
        self._lock = threading.Lock()
        self._headers: dict[str, str] | None = None  # the token and user agent, read once

    def read_at(self, url: str, offset: int, nbytes: int) -> bytes:
        """``nbytes`` bytes of the file at ``url`` from ``offset`` (fewer only at its end)."""
        target = bytearray(nbytes)
        done = self.read_into(url, offset, memoryview(target))
        return bytes(target[:done])

    def read_into(self, url: str, offset: int, target: memoryview) -> int:
        """Fill ``target`` with the file's bytes from ``offset``; return the count.

        Fewer than ``len(target)`` only when the file ends first (a 416 or a short 206).

        Raises:
            InputNotFoundError: the Hub refused (401, 403, 404) or failed after every retry.
        """
        done, tries = 0, 0
        while done < len(target):
            try:
                count, finished = self._get_range(url, offset + done, target[done:])
                done += count
                if finished:
                    return done
            except _RetryableError as err:
                if tries >= self.max_retries:
                    raise InputNotFoundError(
                        f"reading {url} failed after {tries + 1} tries: {err}; check the "
                        "network and rerun (with --resume to keep finished shards)"
                    ) from err.__cause__
                with self._lock:
                    self.retries += 1
                time.sleep(min(self.max_wait, self.base_wait * 2**tries))
                tries += 1
        return done

    def _get_range(self, url: str, offset: int, target: memoryview) -> tuple[int, bool]:
        """One GET of ``bytes=offset-...``: the bytes it delivered, and whether the file ended.

        A connection that drops mid-body keeps the bytes received so far: the
        next try asks for the rest only.
        """
        # huggingface_hub is imported on use: resolve.py imports this module's types.
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session

        if self._headers is None:
            self._headers = build_hf_headers()
        headers = {**self._headers}
        headers["Range"] = f"bytes={offset}-{offset + len(target) - 1}"
        received = 0
        try:
            with get_session().stream(
                "GET",
                url,
                headers=headers,
                follow_redirects=True,
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            ) as response:
                status = response.status_code
                if status == 416:  # the range starts at or past the end of the file
                    return 0, True
                if status in RETRY_STATUSES:
                    raise _RetryableError(f"the server answered {status}")
                if status != 206:
                    raise _refused(url, status)
                for chunk in response.iter_bytes():
                    take = min(len(chunk), len(target) - received)
                    target[received : received + take] = chunk[:take]
                    received += take
        except _HttpError as err:
            if received:  # keep what arrived; the next request asks for the rest
                with self._lock:
                    self.retries += 1
                return received, False
            raise _RetryableError(f"{type(err).__name__}: {err}") from err
        return received, received < len(target)


class _RetryableError(Exception):
    pass


def _refused(url: str, status: int) -> InputNotFoundError:
    if status == 200:
        return InputNotFoundError(
            f"{url} answered a ranged request with the whole file (200, not 206): the "
            "server does not support range requests; merge without --low-disk"
        )
    what = {
        401: "the Hub refused the credentials (401); check HF_TOKEN or `hf auth login`",
        403: "access is forbidden (403); check that your token can read the repo",
        404: "the file is not there (404); was the repo changed during the merge?",
    }.get(status, f"the server answered {status}")
    return InputNotFoundError(f"cannot read {url}: {what}")


class RangedTensorReader(EntryReader):
    """A :class:`~lora_merge.io.reader.StoredTensorSource` over safetensors files on the Hub.

    Each entry's ``path`` names its file; ``files`` maps that path to where the file
    is on the Hub. A read smaller than :data:`READ_AHEAD_BYTES` fetches that much of
    its tensor at once and serves the thread's next reads of it from there: the
    memory a read holds is what the stream asked for plus one such block per thread.

    Args:
        entries: stored tensor name -> location, as parsed from the remote headers.
        files: entry path -> the remote file.
        fetcher: how bytes are fetched (retries and backoff included).
    """

    def __init__(
        self,
        entries: Mapping[str, TensorEntry],
        files: Mapping[Path, RemoteFile],
        fetcher: RangeFetcher | None = None,
    ) -> None:
        super().__init__(entries)
        self._files = dict(files)
        self.fetcher = fetcher or RangeFetcher()
        self._local = threading.local()  # each thread's read-ahead block

    def __enter__(self) -> RangedTensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the HTTP session is huggingface_hub's, shared."""

    def _read_exactly(self, entry: TensorEntry, offset: int, target: memoryview) -> bool:
        return self._read(entry, offset, target) == len(target)

    def prefetch(self, key: str) -> None:
        """No hint to give: the bytes are fetched when read."""

    def copy_bytes(self, key: str, destination: PositionalFile, destination_offset: int) -> int:
        """Copy a tensor's stored bytes into ``destination``, a bounded piece at a time.

        One ranged GET per piece of :data:`~lora_merge.io.positional.COPY_CHUNK_BYTES`:
        the memory a copy holds is that of a local copy through Python.
        """
        entry = self._entries[key]
        piece = memoryview(bytearray(min(COPY_CHUNK_BYTES, entry.nbytes)))
        copied = 0
        while copied < entry.nbytes:
            target = piece[: min(len(piece), entry.nbytes - copied)]
            if self._read(entry, entry.start + copied, target) != len(target):
                raise _shrunk(entry)
            destination.write_all(target, destination_offset + copied)
            copied += len(target)
        return copied

    def _read(self, entry: TensorEntry, offset: int, target: memoryview) -> int:
        """Fill ``target`` from ``offset`` of the entry's file, through the read-ahead block."""
        url = self._files[entry.path].url
        if len(target) >= READ_AHEAD_BYTES:
            return self.fetcher.read_into(url, offset, target)
        block = getattr(self._local, "block", None)
        if block is None:
            block = self._local.block = _Block(memoryview(bytearray(READ_AHEAD_BYTES)))
        if not block.holds(url, offset, len(target)):
            tensor_end = entry.start + entry.nbytes
            wanted = max(len(target), min(READ_AHEAD_BYTES, tensor_end - offset))
            block.url, block.start = url, offset
            block.size = self.fetcher.read_into(url, offset, block.data[:wanted])
        begin = offset - block.start
        count = min(len(target), block.size - begin)
        target[:count] = block.data[begin : begin + count]
        return count


class _Block:
    """Bytes ``start:start + size`` of the file at ``url``, in ``data``."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.url, self.start, self.size = data, "", 0, 0

    def holds(self, url: str, offset: int, nbytes: int) -> bool:
        return (
            url == self.url and self.start <= offset and offset + nbytes <= self.start + self.size
        )


def _shrunk(entry: TensorEntry) -> InvalidInputError:
    return InvalidInputError(
        f"{entry.path.name} on the Hub ended while reading tensor {entry.name!r}: the file "
        "is shorter than its header says, or changed during the merge"
    )
