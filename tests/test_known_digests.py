"""Input sha256 digests known without hashing (io/known_digests.py): huggingface_hub's
``--local-dir`` records and the per-user digest cache.

The oracle is hashlib over each file's bytes, the model card the run wrote, the
cache's JSON file as it lies on disk, and huggingface_hub itself (a real
``snapshot_download(local_dir=...)`` against the fake Hub of tests/support, whose
records huggingface_hub writes). Where a test must show that a digest was *not*
computed, it plants a sentinel where the digest comes from (the cache file, a
record written by huggingface_hub's own writer): a card that shows the sentinel
read the digest there, since hashing the file would have given hashlib's.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, start_fake_hub
from handmade_checkpoints import write_adapter, write_base
from huggingface_hub import constants, snapshot_download
from huggingface_hub._local_folder import write_download_metadata  # the real writer, for tests
from test_provenance_and_push import card_rows

from lora_merge import MergeOptions, merge
from lora_merge.io.known_digests import (
    CACHE_ENV,
    CACHE_FILE_NAME,
    TIMESTAMP_GRANULARITY_NS,
    DigestCache,
    digest_cache_folder,
)
from lora_merge.run.hash_ahead import hash_inputs_ahead

SENTINEL = hashlib.sha256(b"not the file's content").hexdigest()
REPO = "org/tiny-base"
LORA_MERGE = str(Path(sys.executable).with_name("lora-merge"))


def stamp_key(path: Path) -> str:
    """The cache's key for ``path`` as the docs describe it, from os.stat."""
    s = os.stat(path)
    return f"{s.st_dev}:{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}"


def sha256_of_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_file() -> Path:
    return Path(os.environ[CACHE_ENV]) / CACHE_FILE_NAME


def cache_entries() -> dict[str, dict[str, object]]:
    return json.loads(cache_file().read_text(encoding="utf-8"))["entries"]


def inputs_of(base: Path, adapter: Path) -> list[Path]:
    return sorted(p for folder in (base, adapter) for p in folder.iterdir() if p.is_file())


def merge_and_read_card(base: Path, adapter: Path, out: Path) -> dict[str, str]:
    """Merge in this process; the card's sha256 cell by file name."""
    merge(MergeOptions(base, adapter, out, quiet=True))
    return {name: row[2] for name, row in card_rows(out).items()}


def wait_until_settled(paths: list[Path]) -> None:
    """Sleep until every file's mtime and ctime are older than the racy-file margin."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    remaining = newest + TIMESTAMP_GRANULARITY_NS + 200_000_000 - time.time_ns()
    if remaining > 0:
        time.sleep(remaining / 1e9)


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Base and adapter folders for each test below, written once and then left alone for
    longer than the racy-file margin (one wait for the module), so that they may be cached."""
    folders = {}
    for name in ("reused", "rewritten", "corrupt", "ahead"):
        root = tmp_path_factory.mktemp(name)
        write_base(root / "base", shards=2)
        write_adapter(root / "adapter")
        folders[name] = (root / "base", root / "adapter")
    wait_until_settled([p for pair in folders.values() for p in inputs_of(*pair)])
    return folders


def test_the_suite_never_writes_the_real_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """conftest.py points LORA_MERGE_CACHE into pytest's temporary folder for every test."""
    folder = digest_cache_folder()
    assert folder is not None
    assert folder.resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())


def test_a_second_run_takes_the_digests_from_the_cache(
    settled: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, adapter = settled["reused"]
    files = inputs_of(base, adapter)

    # The command first: its digests come from the threads that start before torch is imported.
    result = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(tmp_path / "first"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr

    first = {name: row[2] for name, row in card_rows(tmp_path / "first").items()}
    assert first == {p.name: sha256_of_bytes(p) for p in files}
    entries = cache_entries()
    assert {key: entries[key]["sha256"] for key in entries} == {
        stamp_key(p): sha256_of_bytes(p) for p in files
    }
    # The sentinel in every entry: a run that hashed the files would show hashlib's digests.
    document = json.loads(cache_file().read_text(encoding="utf-8"))
    for entry in document["entries"].values():
        entry["sha256"] = SENTINEL
    cache_file().write_text(json.dumps(document), encoding="utf-8")

    second = merge_and_read_card(base, adapter, tmp_path / "second")

    assert second == {p.name: SENTINEL for p in files}


def test_nothing_is_hashed_ahead_when_every_digest_is_cached(
    settled: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, adapter = settled["ahead"]
    options = MergeOptions(base, adapter, tmp_path / "out")
    ahead = hash_inputs_ahead(options)
    assert ahead is not None  # an empty cache: every file is hashed ahead
    ahead.close()
    merge_and_read_card(base, adapter, tmp_path / "first")

    assert hash_inputs_ahead(options) is None


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="Python's st_ctime is the creation time on Windows: a rewrite in place is not seen "
    "there (a limitation docs/provenance.md states)",
)
def test_a_file_rewritten_in_place_with_its_mtime_set_back_is_hashed_again(
    settled: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, adapter = settled["rewritten"]
    merge_and_read_card(base, adapter, tmp_path / "first")
    shard = sorted(base.glob("*.safetensors"))[0]
    old_digest, before = sha256_of_bytes(shard), shard.stat()
    assert cache_entries()[stamp_key(shard)]["sha256"] == old_digest

    # One byte of the first tensor changed in place: the lowest mantissa byte of its first
    # element (little-endian), so the value stays finite. Same size, mtime set back.
    with open(shard, "r+b") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_length)
        low_byte = handle.read(1)[0]
        handle.seek(8 + header_length)
        handle.write(bytes([low_byte ^ 1]))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns

    second = merge_and_read_card(base, adapter, tmp_path / "second")

    assert second[shard.name] == sha256_of_bytes(shard) != old_digest


def test_a_file_written_during_or_after_the_hashing_start_is_not_cached(tmp_path: Path) -> None:
    """git's racy rule, at its boundary: the hashing must start more than the file system's
    timestamp granularity after the file's last write (mtime or ctime) for it to be stored."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"w" * 100)
    status = path.stat()
    newest = max(status.st_mtime_ns, status.st_ctime_ns)
    cache_path = tmp_path / "cache.json"

    racy = DigestCache(cache_path, started_ns=newest + TIMESTAMP_GRANULARITY_NS)
    racy.remember(path, status, sha256_of_bytes(path))
    racy.save()
    assert not cache_path.exists()

    settled = DigestCache(cache_path, started_ns=newest + TIMESTAMP_GRANULARITY_NS + 1)
    settled.remember(path, status, sha256_of_bytes(path))
    settled.save()
    assert DigestCache(cache_path, started_ns=0).lookup(path) == sha256_of_bytes(path)


def test_a_file_changed_while_it_was_hashed_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"w" * 100)
    before = path.stat()
    path.write_bytes(b"w" * 101)  # written while being hashed: the stamp after differs
    cache = DigestCache(tmp_path / "cache.json", started_ns=time.time_ns() + 10**12)
    cache.remember(path, before, sha256_of_bytes(path))
    cache.save()
    assert not (tmp_path / "cache.json").exists()


def test_a_just_written_input_is_hashed_and_not_cached(handmade_inputs, tmp_path: Path) -> None:
    """An input whose mtime is later than the run's start is never stored, whatever the
    machine's speed (a file written just before the run is the same case, sooner)."""
    base, adapter = handmade_inputs
    files = inputs_of(base, adapter)
    later = time.time_ns() + 3600 * 10**9
    for path in files:
        os.utime(path, ns=(later, later))

    card = merge_and_read_card(base, adapter, tmp_path / "out")

    assert card == {p.name: sha256_of_bytes(p) for p in files}
    assert not cache_file().exists() or cache_entries() == {}


@pytest.mark.parametrize(
    "content",
    [b"\x00\xffnot json{", b"[1, 2]", b'{"format": 1, "entries": []}', b'{"format": 1}', b""],
    ids=["garbage", "a list", "entries not a map", "no entries", "empty"],
)
def test_a_corrupt_cache_file_is_an_empty_cache(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 10)
    cache_path = tmp_path / "cache.json"
    cache_path.write_bytes(content)
    cache = DigestCache(cache_path, started_ns=time.time_ns() + 10**12)
    assert cache.lookup(path) is None
    cache.remember(path, path.stat(), sha256_of_bytes(path))
    cache.save()
    assert DigestCache(cache_path, started_ns=0).lookup(path) == sha256_of_bytes(path)


def test_a_corrupt_cache_file_does_not_stop_a_merge_and_is_overwritten(
    settled: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, adapter = settled["corrupt"]
    files = inputs_of(base, adapter)
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    cache_file().write_bytes(b'{"format": 1, "entries": {"1:2:3:4:5": {"sha256": 7}}')

    card = merge_and_read_card(base, adapter, tmp_path / "out")

    assert card == {p.name: sha256_of_bytes(p) for p in files}
    assert {entry["sha256"] for entry in cache_entries().values()} == set(card.values())


def test_an_unwritable_cache_folder_does_not_stop_a_merge(
    handmade_inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("a file where the cache folder should be")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    base, adapter = handmade_inputs
    card = merge_and_read_card(base, adapter, tmp_path / "out")
    assert card == {p.name: sha256_of_bytes(p) for p in inputs_of(base, adapter)}


def test_entries_of_files_gone_or_changed_are_pruned(tmp_path: Path) -> None:
    kept, deleted, changed = (tmp_path / f"{name}.bin" for name in ("kept", "deleted", "changed"))
    for path in (kept, deleted, changed):
        path.write_bytes(path.name.encode())
    cache_path = tmp_path / "cache.json"
    cache = DigestCache(cache_path, started_ns=time.time_ns() + 10**12)
    for path in (kept, deleted, changed):
        cache.remember(path, path.stat(), sha256_of_bytes(path))
    deleted.unlink()
    changed.write_bytes(b"longer than before")
    cache.save()
    saved = json.loads(cache_path.read_text(encoding="utf-8"))["entries"]
    assert {entry["path"] for entry in saved.values()} == {str(kept)}


def test_the_cache_can_be_turned_off(
    handmade_inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    assert digest_cache_folder() is None
    base, adapter = handmade_inputs
    card = merge_and_read_card(base, adapter, tmp_path / "out")
    assert card == {p.name: sha256_of_bytes(p) for p in inputs_of(base, adapter)}


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG rule is for Linux")
def test_the_default_folder_follows_xdg(tmp_path: Path) -> None:
    assert digest_cache_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "lora-merge"
    # A relative XDG_CACHE_HOME is invalid (XDG spec) and ignored.
    relative = digest_cache_folder({"XDG_CACHE_HOME": "relative"})
    assert relative == Path.home() / ".cache" / "lora-merge"


# --- hf download --local-dir ------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    # The fake Hub speaks LFS, not xet (huggingface_hub's own fallback when xet is off).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    # The suite runs offline (conftest.py); this server is local, the one place to reach.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server, fake = start_fake_hub()
    yield fake
    server.shutdown()


def test_a_local_dir_download_gives_its_recorded_sha256(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's record of a --local-dir download gives each LFS file's sha256 while
    the file is not newer than it; a file modified after the download is hashed, and so is
    every file when the cache is turned off."""
    served, adapter = tmp_path / "served", tmp_path / "adapter"
    write_base(served, shards=3)
    write_adapter(adapter)
    commit = hub.serve_folder(REPO, served)
    local = tmp_path / "local"
    snapshot_download(REPO, local_dir=local, endpoint=hub.url, token=hub.token)
    first, second, third = sorted(local.glob("*.safetensors"))
    # A sentinel recorded by huggingface_hub's writer for the first shard: the card shows it
    # only if the record is where the digest came from.
    write_download_metadata(local, first.name, commit, SENTINEL)
    # The third shard changed after its download (the first element's lowest mantissa
    # byte), its modification time after the record's.
    data = bytearray(third.read_bytes())
    (header_length,) = struct.unpack("<Q", bytes(data[:8]))
    data[8 + header_length] ^= 1
    third.write_bytes(data)
    later = time.time_ns() + 10 * 10**9
    os.utime(third, ns=(later, later))
    tree_before = {p: p.stat().st_mtime_ns for p in local.rglob("*")}

    card = merge_and_read_card(local, adapter, tmp_path / "out")

    assert card[first.name] == SENTINEL
    assert card[second.name] == sha256_of_bytes(served / second.name) == sha256_of_bytes(second)
    assert card[third.name] == sha256_of_bytes(third) != sha256_of_bytes(served / third.name)
    # Small files' records hold their git hash, not a sha256: they are hashed.
    assert card["config.json"] == sha256_of_bytes(local / "config.json")
    # Nothing was written into the input folder (huggingface_hub's reader writes lock files).
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*")} == tree_before

    # LORA_MERGE_CACHE=off: no record is trusted either, every file is hashed.
    monkeypatch.setenv(CACHE_ENV, "off")
    card = merge_and_read_card(local, adapter, tmp_path / "out-uncached")
    assert card[first.name] == sha256_of_bytes(first) != SENTINEL
    assert card == {p.name: sha256_of_bytes(p) for p in inputs_of(local, adapter)}
