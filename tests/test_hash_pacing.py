"""The input files' hashing follows the merge's reads (io/read_pacing.py, io/hashing.FileHashes).

On a model bigger than the page cache, hashing that runs its own course reads
every byte from the disk a second time. The pacing hashes BASE's shards in the
order the merge reads them, never more than a lead of bytes beyond those the
merge has read. These tests watch a real ``lora-merge`` run from outside, at the
system calls: ``os.preadv`` and ``os.copy_file_range`` (every read and copy of
BASE's tensors) and Python's ``mmap.__new__`` audit event (every window the
hasher maps). The oracles: that trace, hashlib over each file, and a cgroup file
tree written by hand for the lead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_provenance_and_push import card_rows

from lora_merge.io.hashing import HASH_WINDOW_BYTES, FileHashes
from lora_merge.io.read_pacing import MIN_LEAD_BYTES, ByteRanges, ReadPacing, hashing_lead_bytes

SIDE = 1024  # float32 rows of 4 KiB: each tensor is 4 MiB
# The index names the second file first, then the third: neither the sorted order nor
# the largest-first order (the sizes differ) is the merge's.
SHARD_LAYERS = {
    "model-00002-of-00003.safetensors": range(0, 7),
    "model-00003-of-00003.safetensors": range(7, 16),
    "model-00001-of-00003.safetensors": range(16, 24),
}
LEAD = MIN_LEAD_BYTES
COPIED_LAYERS = {6, 9, 23}

# Runs lora-merge's console script with the system calls recorded into TRACE; LEAD is the lead.
_TRACING_BOOTSTRAP = """
import json, os, sys, threading
from importlib.metadata import entry_points

events, lock = [], threading.Lock()

def record(kind, descriptor, nbytes):
    status = os.fstat(descriptor)
    with lock:
        events.append((kind, status.st_ino, nbytes))

real_preadv, real_copy = os.preadv, os.copy_file_range

def preadv(descriptor, buffers, offset, *rest):
    count = real_preadv(descriptor, buffers, offset, *rest)
    record("read", descriptor, count)
    return count

def copy_file_range(source, destination, count, offset_src=None, offset_dst=None):
    copied = real_copy(source, destination, count, offset_src, offset_dst)
    record("read", source, copied)
    return copied

def audit(event, arguments):
    if event == "mmap.__new__" and arguments[0] >= 0:
        descriptor, length, _, offset = arguments
        record("hash", descriptor, offset + length)

os.preadv, os.copy_file_range = preadv, copy_file_range
sys.addaudithook(audit)
import lora_merge.run.hash_ahead as hash_ahead
hash_ahead.hashing_lead_bytes = lambda paced_bytes: LEAD
(command,) = entry_points(group="console_scripts", name="lora-merge")
sys.argv = ["lora-merge", *sys.argv[1:]]
try:
    command.load()()
finally:
    with open(TRACE, "w") as trace:
        json.dump(events, trace)
"""


def write_sharded_base_and_adapter(root: Path) -> tuple[Path, Path]:
    """A float32 base of 24 tensors in three files, LoRA on all but one of each file's."""
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for file_name, layers in SHARD_LAYERS.items():
        tensors = {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(SIDE, SIDE, generator=generator)
            for i in layers
        }
        save_file(tensors, base / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {"total_size": 4 * SIDE * SIDE * 24}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    lora = {}
    # Each file's last tensor (by name, as safetensors stores them) is copied while torch
    # imports, far ahead of the stream, as a model's norms are: a pacing by the furthest
    # byte read would let the hasher run through the whole file then.
    for i in sorted(set(range(24)) - COPIED_LAYERS):
        prefix = f"base_model.model.model.layers.{i}.mlp.up_proj"
        lora[f"{prefix}.lora_A.weight"] = torch.randn(2, SIDE, generator=generator)
        lora[f"{prefix}.lora_B.weight"] = torch.randn(SIDE, 2, generator=generator)
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["up_proj"]})
    )
    return base, adapter


def test_shards_are_hashed_in_the_merges_order_within_the_lead(tmp_path: Path) -> None:
    base, adapter = write_sharded_base_and_adapter(tmp_path)
    out, trace = tmp_path / "merged", tmp_path / "trace.json"
    bootstrap = f"LEAD = {LEAD}\nTRACE = {str(trace)!r}\n" + _TRACING_BOOTSTRAP
    result = subprocess.run(
        [sys.executable, "-c", bootstrap, str(base), str(adapter), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr

    shards = {(base / name).stat().st_ino: name for name in SHARD_LAYERS}
    events = [
        (kind, shards[inode], n)
        for kind, inode, n in json.loads(trace.read_text())
        if inode in shards
    ]
    read = dict.fromkeys(SHARD_LAYERS, 0)
    hashed = dict.fromkeys(SHARD_LAYERS, 0)
    read_order: list[str] = []
    hash_order: list[str] = []
    for kind, name, nbytes in events:
        if kind == "read":
            read[name] += nbytes
            if nbytes > SIDE and name not in read_order:  # a tensor's bytes, not a header's
                read_order.append(name)
        else:
            # Each window once, in order: the hasher reads no byte twice.
            assert nbytes > hashed[name], f"{name}: window ending at {nbytes} mapped again"
            hashed[name] = nbytes
            if name not in hash_order:
                hash_order.append(name)
            # The bound, as the merge's own reads counted so far show it.
            ahead = sum(max(0, hashed[s] - read[s]) for s in SHARD_LAYERS)
            assert ahead <= LEAD, f"hashed {ahead} bytes beyond the reads, lead {LEAD}"
    assert hash_order == read_order == list(SHARD_LAYERS)
    assert all(hashed[name] == (base / name).stat().st_size for name in SHARD_LAYERS)
    # The card's digests are those of the files' bytes.
    rows = card_rows(out)
    for path in [*base.iterdir(), *adapter.iterdir()]:
        data = path.read_bytes()
        assert rows[path.name][1:] == [str(len(data)), hashlib.sha256(data).hexdigest()]


def test_a_stopped_run_stops_a_hasher_waiting_for_reads(tmp_path: Path) -> None:
    """close() wakes a thread waiting for reads that will never come; digests asked for
    afterwards are computed then."""
    data = os.urandom(3 * HASH_WINDOW_BYTES + 5)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    pacing = ReadPacing(MIN_LEAD_BYTES, [path])
    hashes = FileHashes([path], workers=1, pacing=pacing)
    waiting = [t for t in threading.enumerate() if t.name.startswith("lora-merge-hash")]
    hashes.close()
    for thread in waiting:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert hashes.sha256(path) == hashlib.sha256(data).hexdigest()


def test_a_released_pacing_hashes_what_the_merge_never_read(tmp_path: Path) -> None:
    data = os.urandom(MIN_LEAD_BYTES + 3 * HASH_WINDOW_BYTES)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with FileHashes([path], workers=1, pacing=ReadPacing(MIN_LEAD_BYTES, [path])) as hashes:
        hashes.release_pacing()
        assert hashes.sha256(path) == hashlib.sha256(data).hexdigest()


def test_the_lead_is_a_share_of_the_tightest_room_or_two_windows(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")  # 16 GiB
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job" / "step").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{4 * 2**30}\n")
    (v1 / "memory" / "job" / "memory.stat").write_text(f"cache 5\ntotal_rss {2**30}\n")
    (v1 / "memory" / "job" / "step" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
    v1_self = tmp_path / "v1_cgroup"
    v1_self.write_text("4:memory:/job/step\n1:cpu:/\n")
    # The job's 4 GiB less 1 GiB of anonymous memory: a quarter of it for shards that fit.
    assert hashing_lead_bytes(2**30, meminfo, v1_self, v1) == 3 * 2**30 // 4
    assert hashing_lead_bytes(3 * 2**30 + 1, meminfo, v1_self, v1) == MIN_LEAD_BYTES

    v2 = tmp_path / "v2"
    (v2 / "user").mkdir(parents=True)
    (v2 / "user" / "memory.max").write_text(f"{8 * 2**30}\n")
    (v2 / "user" / "memory.stat").write_text(f"anon {2**30}\nfile 7\n")
    v2_self = tmp_path / "v2_cgroup"
    v2_self.write_text("0::/user\n")
    assert hashing_lead_bytes(2**30, meminfo, v2_self, v2) == 7 * 2**30 // 4
    (v2 / "user" / "memory.max").write_text("max\n")
    assert hashing_lead_bytes(2**30, meminfo, v2_self, v2) == 16 * 2**30 // 4  # MemAvailable's
    assert hashing_lead_bytes(20 * 2**30, meminfo, v2_self, v2) == MIN_LEAD_BYTES


def test_byte_ranges_count_each_byte_once() -> None:
    generator = random.Random(0)
    for _ in range(500):
        ranges, covered = ByteRanges(), set()
        for _ in range(generator.randint(1, 12)):
            start = generator.randint(0, 60)
            end = start + generator.randint(0, 15)
            ranges.add(start, end)
            covered |= set(range(start, end))
        assert ranges.total == len(covered)
