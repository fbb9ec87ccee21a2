"""How much slower the portable I/O path (macOS, Windows) is than Linux's system calls, on Linux.

lora-merge reads and writes with ``os.preadv``/``os.pwrite``, hints the kernel
with ``os.posix_fadvise`` and copies untouched tensors with
``os.copy_file_range`` where the OS has them (see ``io/positional.py``). This
benchmark hides those functions, as macOS (no fadvise, no copy_file_range) and
Windows (none of them) lack them, and times the same merge each way, in turn,
in one command::

    .venv/bin/python benchmarks/bench_portable_io.py [--shape 1b] [--runs 3]

It prints a table of median wall and CPU seconds per path and the ratio to the
Linux path (paired, run by run). The outputs of every path are compared byte
for byte after each round. With ``--hide NAMES -- ARGS`` it instead runs one
merge with those functions hidden (what the table times), for outside timers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATHS = {
    "linux (all system calls)": "",
    "macOS path (no fadvise, no copy_file_range)": "posix_fadvise,copy_file_range",
    "Windows path (no preadv/pread/pwrite/fadvise/copy_file_range)": (
        "preadv,pread,pwrite,posix_fadvise,copy_file_range"
    ),
}


def run_hidden(names: str, arguments: Sequence[str]) -> int:
    """Run the CLI with the named ``os`` functions removed first."""
    for name in filter(None, names.split(",")):
        if hasattr(os, name):
            delattr(os, name)
    from lora_merge.cli import main  # imported after hiding, as a fresh process would

    sys.argv = ["lora-merge", *arguments]
    main()
    return 0


def timed_merge(names: str, base: str, adapter: str, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one merge subprocess (with a final sync, as a user's copy would)."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--hide", names, "--", base, adapter, str(out), "--quiet"],
        check=True,
    )
    os.sync()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--hide"]:
        return run_hidden(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/portable_io"))
    args = parser.parse_args(argv)
    built = subprocess.run(
        [
            sys.executable,
            str(HERE / "synthetic_checkpoints.py"),
            "--shape",
            args.shape,
            "--targets",
            args.targets,
            "--workdir",
            str(args.workdir),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    inputs = json.loads(built.stdout.strip().splitlines()[-1])
    outs = {label: args.workdir / f"out-{index}" for index, label in enumerate(PATHS)}
    walls: dict[str, list[float]] = {label: [] for label in PATHS}
    cpus: dict[str, list[float]] = {label: [] for label in PATHS}
    timed_merge("", inputs["base"], inputs["adapter"], outs["linux (all system calls)"])  # warm-up
    for _ in range(args.runs):
        for label, names in PATHS.items():
            wall, cpu = timed_merge(names, inputs["base"], inputs["adapter"], outs[label])
            walls[label].append(wall)
            cpus[label].append(cpu)
        reference = folder_bytes(outs["linux (all system calls)"])
        for label, out in outs.items():
            if folder_bytes(out) != reference:
                print(f"OUTPUT DIFFERS: {label}", file=sys.stderr)
                return 1
    baseline = walls["linux (all system calls)"]
    print(f"{args.shape} {args.targets}, {args.runs} paired runs, medians; outputs byte-identical")
    print(f"| {'path':<62} | wall s | CPU s | wall ratio to linux (min-max) |")
    print(f"|{'-' * 64}|--------|-------|-------------------------------|")
    for label in PATHS:
        ratios = [w / b for w, b in zip(walls[label], baseline, strict=True)]
        print(
            f"| {label:<62} | {statistics.median(walls[label]):6.2f} "
            f"| {statistics.median(cpus[label]):5.2f} "
            f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            f"{' ' * 14}|"
        )
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
