"""Start-up time of the ``lora-merge`` command, beside the interpreter's own floors.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_startup.py                 # 15 rounds
    .venv/bin/python benchmarks/bench_startup.py --repeat 30 --baseline OTHER/.venv/bin/lora-merge

Each row is a whole process, timed from outside (start to exit, interpreter
start-up included): ``lora-merge --version``, ``lora-merge --help``, ``python -c
"import lora_merge"``, and the floors they stand on: ``python -c pass`` (the
interpreter alone), ``import typer`` (the command-line library, before any of
ours), and ``import torch`` (what every merge needs, and what start-up must not
pay). The commands run in turn, round after round (A B C ... A B C ...), so a
machine whose speed drifts slows every row alike; the table shows medians, and
each row's ratio to ``python -c pass`` and to ``import torch`` is the median of
the ratios taken round by round. ``--baseline`` adds ``--version`` and ``--help``
rows for another build (e.g. one before a change) measured in the same rounds.

``main()`` returns 0 and prints a Markdown table; :func:`measure_startup` gives
the rows to a caller (the benchmark suite).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PASS_FLOOR = "python -c pass"
TORCH_FLOOR = 'python -c "import torch"'


@dataclass(frozen=True)
class StartupRow:
    """One command's figures: medians over the rounds, and the ratios to the two floors."""

    label: str
    wall_seconds: float
    cpu_seconds: float
    vs_pass: float
    vs_torch: float


def startup_commands(lora_merge: str, baseline: str | None = None) -> dict[str, list[str]]:
    """Every command to time, by the label the table shows."""
    python = sys.executable
    commands = {
        "lora-merge --version": [lora_merge, "--version"],
        "lora-merge --help": [lora_merge, "--help"],
        'python -c "import lora_merge"': [python, "-c", "import lora_merge"],
        'python -c "import typer"': [python, "-c", "import typer"],
        TORCH_FLOOR: [python, "-c", "import torch"],
        PASS_FLOOR: [python, "-c", "pass"],
    }
    if baseline is not None:
        commands["baseline --version"] = [baseline, "--version"]
        commands["baseline --help"] = [baseline, "--help"]
    return commands


def timed_run(command: Sequence[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``command``, its output discarded.

    Raises:
        RuntimeError: the command failed.
    """
    before = os.times()
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    after = os.times()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.decode()[-500:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def measure_startup(
    repeat: int = 15, lora_merge: str | None = None, baseline: str | None = None
) -> list[StartupRow]:
    """Time every command of :func:`startup_commands` ``repeat`` times, in turn.

    Args:
        repeat: rounds; each round runs every command once (after one warm-up round).
        lora_merge: the command to time; default: ``lora-merge`` beside this Python.
        baseline: another ``lora-merge`` to time in the same rounds, or None.

    Returns:
        One row per command, in the order of :func:`startup_commands`.
    """
    lora_merge = lora_merge or str(Path(sys.executable).parent / "lora-merge")
    commands = startup_commands(lora_merge, baseline)
    walls: dict[str, list[float]] = {label: [] for label in commands}
    cpus: dict[str, list[float]] = {label: [] for label in commands}
    for round_number in range(repeat + 1):
        for label, command in commands.items():
            wall, cpu = timed_run(command)
            if round_number:  # round 0 warms the page cache
                walls[label].append(wall)
                cpus[label].append(cpu)
    rows = []
    for label in commands:
        vs_pass = [a / b for a, b in zip(walls[label], walls[PASS_FLOOR], strict=True)]
        vs_torch = [a / b for a, b in zip(walls[label], walls[TORCH_FLOOR], strict=True)]
        rows.append(
            StartupRow(
                label,
                statistics.median(walls[label]),
                statistics.median(cpus[label]),
                statistics.median(vs_pass),
                statistics.median(vs_torch),
            )
        )
    return rows


def startup_table(rows: Sequence[StartupRow], repeat: int) -> str:
    """The rows as a Markdown table, with a title line."""
    lines = [
        f"start-up, {repeat} rounds, medians (ratios: median of the per-round ratios)",
        "",
        "| command | wall s | CPU s | x `python -c pass` | x `import torch` |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.label}` | {row.wall_seconds:.3f} | {row.cpu_seconds:.3f} "
            f"| {row.vs_pass:.2f} | {row.vs_torch:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="rounds (default 15)")
    parser.add_argument("--lora-merge", help="the lora-merge to time (default: this venv's)")
    parser.add_argument(
        "--baseline", help="another lora-merge to time in the same rounds (e.g. a main build's)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    rows = measure_startup(args.repeat, args.lora_merge, args.baseline)
    print(startup_table(rows, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
