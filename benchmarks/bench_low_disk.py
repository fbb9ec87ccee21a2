"""Hub to Hub with ``--low-disk`` against a plain merge: wall time and peak local disk.

Serves BASE and ADAPTER from a local fake Hub (``tests/support/fake_hub.py``, the same
server the tests use: ranged GETs, 302 to a CDN host, LFS uploads), then runs,
one after the other, each as a fresh ``lora-merge`` process:

* ``low-disk``: ``lora-merge org/base org/adapter OUT --push-to-hub me/low-disk --low-disk``;
* ``hub-plain``: the same Hub ids without ``--low-disk`` (the base downloaded to the
  HF cache, OUT written whole, then uploaded);
* ``local``: the local folders merged into a local OUT (no Hub at all).

Every byte lora-merge may write goes under one folder per run (``--workdir/RUN``):
``HF_HOME`` (the cache), ``TMPDIR``, and OUT's parent (the staging folder). A
thread samples that folder's size every 20 ms for the peak (a benchmark, not a
test: a sample can miss a short peak, never invent one). The shards the Hub
received from ``low-disk`` are checked against ``hub-plain``'s by sha256.

Example (the 1.1B benchmark model, 3 output shards of 1 GB):

    .venv/bin/python benchmarks/bench_low_disk.py \\
        --base /work/bench-data/models/llama-1b-seed0 \\
        --adapter /work/bench-data/adapters/lora-r16-all-linear-llama-1b-seed0 \\
        --workdir /tmp/low-disk-bench --max-shard-size 1GB
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from fake_hub import start_fake_hub

LORA_MERGE = str(Path(sys.executable).with_name("lora-merge"))


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # deleted while walking
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def run_sampled(command: list[str], env: dict[str, str], folder: Path) -> tuple[float, int]:
    """Run ``command``; return its wall seconds and the peak size of ``folder``."""
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, folder_bytes(folder))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--store", type=Path, help="keep uploaded shards as files here")
    parser.add_argument(
        "--discard-uploads",
        action="store_true",
        help="check each uploaded shard's sha256 and keep no bytes (a model bigger than RAM)",
    )
    parser.add_argument(
        "--runs",
        default="low-disk,hub-plain,local",
        help="which runs, comma-separated (e.g. low-disk alone, its workdir on a small tmpfs)",
    )
    arguments = parser.parse_args()
    server, hub = start_fake_hub()
    hub.store, hub.discard_uploads = arguments.store, arguments.discard_uploads
    hub.serve_folder("org/base", arguments.base)
    hub.serve_folder("org/adapter", arguments.adapter)
    shutil.rmtree(arguments.workdir, ignore_errors=True)
    shard = ["--max-shard-size", arguments.max_shard_size, "-q"]
    runs = {
        "low-disk": ["org/base", "org/adapter", "--push-to-hub", "me/low-disk", "--low-disk"],
        "hub-plain": ["org/base", "org/adapter", "--push-to-hub", "me/hub-plain"],
        "local": [str(arguments.base), str(arguments.adapter)],
    }
    figures: dict[str, object] = {}
    for name in arguments.runs.split(","):
        inputs = runs[name]
        folder = arguments.workdir / name
        (folder / "tmp").mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(
            HF_ENDPOINT=hub.url,
            HF_TOKEN=hub.token,
            HF_HOME=str(folder / "hf-home"),
            TMPDIR=str(folder / "tmp"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        command = [LORA_MERGE, *inputs[:2], str(folder / "out"), *inputs[2:], *shard]
        seconds, peak = run_sampled(command, env, folder)
        figures[name] = {"seconds": round(seconds, 1), "peak_disk_bytes": peak}
        print(f"{name:10} {seconds:8.1f} s   peak local disk {peak / 1e9:6.2f} GB", flush=True)
    # What reached the Hub (LFS object ids are sha256, checked on upload) and the plain
    # run's shards: equal when low-disk's upload is byte-identical to the plain merge.
    shard_sums: dict[str, dict[str, str]] = {}
    if "me/low-disk" in hub.repos:
        shard_sums["low-disk"] = dict(sorted(hub.repos["me/low-disk"].lfs_oids.items()))
    plain_out = arguments.workdir / "hub-plain" / "out"
    for path in sorted(plain_out.glob("*.safetensors")):
        shard_sums.setdefault("hub-plain", {})[path.name] = sha256_of_file(path)
    figures["shard_sha256"] = shard_sums
    if len(shard_sums) == 2:
        figures["identical"] = shard_sums["low-disk"] == shard_sums["hub-plain"]
        print(f"low-disk upload identical to hub-plain: {figures['identical']}", flush=True)
    print(json.dumps(figures))
    server.shutdown()


if __name__ == "__main__":
    main()
