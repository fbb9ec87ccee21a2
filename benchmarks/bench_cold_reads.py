"""Bytes a merge reads from the disk, cold, with the page cache smaller than the model.

What it measures: the input hashing of the model card must read each input byte
from the disk at most once (docs/benchmarks.md, "Hashing within the page cache").
Each run starts with the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``)
and the merge runs in a cgroup v1 memory cgroup whose limit (page cache included:
the kernel charges a page to the cgroup that reads it) is smaller than the model.
The figures are the child's own ``wait4`` accounting: ``ru_inblock`` (512-byte
blocks it caused to be read from storage, by reads, page faults and read-ahead,
all threads together), user and system CPU, and the wall time. The digest cache
is off (``LORA_MERGE_CACHE=off``): every run hashes its inputs.

Linux only, as root (cgroup v1 mounted at /sys/fs/cgroup/memory). It drops the
machine's page cache before every run: nothing else should be measuring then.

    .venv/bin/python benchmarks/bench_cold_reads.py BASE ADAPTER OUT_PARENT \\
        --src after=src --src before=/path/to/main/src --limit 4G --repeat 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/memory/lora-merge-bench")


def run_once(src: Path, base: Path, adapter: Path, out: Path, extra: list[str]) -> dict[str, float]:
    """One cold merge in the cgroup; its disk reads, CPU and wall time."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    # No digest cache: a digest known from an earlier run would hide the hashing measured.
    environment = {**os.environ, "PYTHONPATH": str(src.resolve()), "LORA_MERGE_CACHE": "off"}
    command = [sys.executable, "-m", "lora_merge", str(base), str(adapter), str(out), "--quiet"]
    started = time.perf_counter()
    child = subprocess.Popen(
        [*command, *extra],
        env=environment,
        # Into the cgroup before it reads anything: its page cache is charged there.
        preexec_fn=lambda: (CGROUP / "cgroup.procs").write_text(f"{os.getpid()}\n"),
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the merge failed ({os.waitstatus_to_exitcode(status)})")
    inputs = sum(p.stat().st_size for p in [*base.iterdir(), *adapter.iterdir()] if p.is_file())
    shutil.rmtree(out)
    return {
        "read_GB": usage.ru_inblock * 512 / 1e9,
        "input_GB": inputs / 1e9,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out_parent", type=Path)
    parser.add_argument("--src", action="append", required=True, help="LABEL=SRC_FOLDER")
    parser.add_argument("--limit", default="4G", help="the cgroup's memory limit")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--option", action="append", default=[], help="a lora-merge option (--option=--dtype=bf16)"
    )
    arguments = parser.parse_args()
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(arguments.limit)
    sources = [entry.split("=", 1) for entry in arguments.src]
    arguments.out_parent.mkdir(parents=True, exist_ok=True)
    for round_number in range(arguments.repeat):
        for label, src in sources:  # interleaved: before and after see the same machine
            out = arguments.out_parent / "merged"
            figures = run_once(Path(src), arguments.base, arguments.adapter, out, arguments.option)
            shown = "  ".join(f"{name} {value:.2f}" for name, value in figures.items())
            print(f"{arguments.base.name} {label} round {round_number + 1}: {shown}", flush=True)


if __name__ == "__main__":
    main()
