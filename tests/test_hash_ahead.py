"""The input files' sha256, started before torch is imported (hash_ahead.py, io/hashing.FileHashes).

The oracle is hashlib over each file's bytes, and the model card's own list of
the files a merge read.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from handmade_checkpoints import write_adapter, write_base
from test_provenance_and_push import card_rows
from test_startup import run_traced

from lora_merge.io.hashing import HASH_WINDOW_BYTES, FileHashes
from lora_merge.run.hash_ahead import local_input_files

LORA_MERGE = str(Path(sys.executable).with_name("lora-merge"))


def test_the_files_hashed_ahead_are_those_the_card_lists(tmp_path: Path) -> None:
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    write_base(base, shards=2)
    write_adapter(adapter)
    result = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = card_rows(out)
    assert {path.name for path in local_input_files(base, [adapter])} == set(rows)
    for path in local_input_files(base, [adapter]):
        data = path.read_bytes()
        assert rows[path.name][1:] == [str(len(data)), hashlib.sha256(data).hexdigest()]


def test_a_hub_id_or_a_loralib_file_gives_nothing_to_hash_ahead(tmp_path: Path) -> None:
    loralib_file = tmp_path / "lora.pt"
    loralib_file.write_bytes(b"not read")
    assert local_input_files("org/model", [loralib_file]) == []


def test_a_file_changed_after_it_was_hashed_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    with FileHashes([path], workers=1) as hashes:
        assert hashes.sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
        status = path.stat()
        path.write_bytes(b"b" * 1000)  # the same size...
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # ...a new time
        assert hashes.sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_any_path_to_the_file_finds_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"c" * 5000)
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    with FileHashes([link], workers=2) as hashes:
        assert (
            hashes.sha256(tmp_path / "." / "weights.bin") == hashlib.sha256(b"c" * 5000).hexdigest()
        )


def test_stopped_hashing_still_gives_every_digest(tmp_path: Path) -> None:
    """close() (a failing run) stops the threads; a digest asked for after is computed then."""
    data = os.urandom(3 * HASH_WINDOW_BYTES)
    paths = [tmp_path / f"shard-{i}.bin" for i in range(3)]
    for path in paths:
        path.write_bytes(data)
    hashes = FileHashes(paths, workers=1)
    hashes.close()
    for path in paths:
        assert hashes.sha256(path) == hashlib.sha256(data).hexdigest()


def test_hashing_ahead_imports_no_torch(tmp_path: Path) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_base(base, shards=2)
    write_adapter(adapter)
    code = (
        "from lora_merge.run.hash_ahead import hash_inputs_ahead\n"
        "from lora_merge.options.settings import MergeOptions\n"
        f"hashes = hash_inputs_ahead(MergeOptions({str(base)!r}, {str(adapter)!r}, 'out'))\n"
        f"print(hashes.sha256(__import__('pathlib').Path({str(base / 'config.json')!r})))\n"
    )
    result, packages = run_traced(code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256((base / "config.json").read_bytes()).hexdigest()
    assert "torch" not in packages
