"""The benchmark table of docs/benchmarks.md: every shape and adapter variant, one table.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_suite.py                    # everything, --repeat 3
    .venv/bin/python benchmarks/bench_suite.py --only 1b-all 1b-qv --repeat 1

Each row is one run of ``bench_merge.py`` (see its docstring for what is
measured and how: inputs read into the page cache before every run, ``sync``
after it, medians over the repeats, ``ru_maxrss`` of each child). In every row
``cp -r`` of the same base, lora-merge and PEFT run interleaved in the same
invocation, so each ratio compares figures taken side by side. PEFT is skipped
where it would need more RAM than this machine has (it loads the whole model,
plus the output it saves): the row says so.

Rows (synthetic random-weight bf16 Llama checkpoints, LoRA r=16, alpha=32):

* ``1b-all``: TinyLlama-1.1B shape, LoRA on all 7 linear projections; also
  lora-merge with ``--no-hash-inputs`` (the cost of the model card's sha256).
* ``1b-qv``: the same base, LoRA on q_proj and v_proj only (most bytes untouched).
* ``1b-nf4``: the 1b base quantized to NF4 with double quantization (bitsandbytes),
  merged into bf16; ``cp -r`` copies the bf16 base, a folder the size of the output.
* ``3b-all``: OpenLLaMA-3B shape (hidden 3200, 26 layers, 6.4 GB).
* ``7b-all``: Llama-2-7B shape (hidden 4096, 32 layers, 13.5 GB); also with
  ``--max-memory 256MB``.
* ``startup``: ``lora-merge --version`` and ``--help`` beside the interpreter's
  floors (``bench_startup.py``), at least 10 rounds.

The ``target`` column holds issue 24's targets (issue 17's for 1b-nf4 and
start-up), each ratio being lora-merge + sync over ``cp -r`` + sync (the on-disk
ratio) with default flags, and a peak RSS of at most 300 MB: 1b-all <= 2.0x,
1b-qv <= 1.15x, 1b-nf4 <= 2x (``cp -r`` of a folder the size of the output),
7b-all <= 1.5x; start-up <= 0.3 s. Issue 24's CPU target (7B: at most 2.0
CPU-s per GB of output) is the CPU column divided by the output's size.
``--before SRC`` adds, in every row, the same merge run from an earlier
checkout's ``src/`` (and its ``.venv``'s ``lora-merge`` in the start-up table):
before and after in one run. Every lora-merge run starts with an empty digest
cache (first-run figures); ``--warm-digest-cache`` measures re-runs over the same
inputs, their sha256 taken from the cache. ``make bench-suite`` runs everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))

import bench_merge  # noqa: E402  (needs BENCHMARKS_DIR on sys.path)
import bench_startup  # noqa: E402
import synthetic_checkpoints  # noqa: E402

# PEFT holds the whole model in memory and save_pretrained adds buffers on top;
# measured at 1b: peak RSS 2.6 GB for a 2.2 GB model. Skip it where that would
# come near the machine's RAM.
PEFT_RAM_FACTOR = 1.6


# Issue 24's targets (17's for NF4 and start-up): lora-merge + sync over ``cp -r`` + sync (the on-disk ratio),
# default flags, and the peak RSS of every run.
PEAK_RSS_TARGET_BYTES = 300 * 1024 * 1024
# ``lora-merge --version`` and ``--help``, whole processes.
STARTUP_TARGET_S = 0.3
STARTUP_KEY = "startup"


@dataclass(frozen=True)
class SuiteRow:
    key: str
    label: str
    shape: str
    targets: str
    variants: tuple[str, ...] = ()
    quantize: str | None = None
    target_ratio: float | None = None


ROWS = (
    SuiteRow(
        "1b-all",
        "1.1B all-linear r=16",
        "1b",
        "all-linear",
        ("no input hashes:--no-hash-inputs",),
        target_ratio=2.0,
    ),
    SuiteRow("1b-qv", "1.1B q/v only r=16", "1b", "q-v", target_ratio=1.15),
    SuiteRow(
        "1b-nf4",
        "NF4 1.1B -> bf16, all-linear r=16",
        "1b",
        "all-linear",
        quantize="nf4",
        target_ratio=2.0,
    ),
    SuiteRow("3b-all", "3B all-linear r=16", "3b", "all-linear"),
    SuiteRow(
        "7b-all",
        "7B all-linear r=16",
        "7b",
        "all-linear",
        ("--max-memory 256MB:--max-memory 256MB",),
        target_ratio=1.5,
    ),
)

COLUMNS = (
    "case",
    "lora-merge wall s",
    "cp -r wall s",
    "ratio",
    "on-disk ratio",
    "target",
    "lora-merge peak RSS MB",
    "lora-merge CPU s (user + sys)",
    "PEFT wall s",
    "PEFT peak RSS MB",
)


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_row(row: SuiteRow, args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    """Run bench_merge.py for one row; return its JSON report (plus the PEFT decision)."""
    shape = synthetic_checkpoints.SHAPES[row.shape]
    base_bytes = sum(spec.byte_size for spec in synthetic_checkpoints.base_tensor_specs(shape))
    peft_needs = int(base_bytes * PEFT_RAM_FACTOR)
    skip_peft = args.skip_peft or peft_needs > total_ram_bytes() or row.quantize is not None
    report_path = scratch / f"{row.key}.json"
    argv = [
        "--shape",
        row.shape,
        "--targets",
        row.targets,
        "--repeat",
        str(args.repeat),
        "--json",
        str(report_path),
        "--workdir",
        str(args.workdir),
    ]
    for variant in row.variants:
        argv += ["--variant", variant]
    if skip_peft:
        argv.append("--skip-peft")
    if row.quantize:
        argv += ["--quantize", row.quantize]
    if args.cold:
        argv.append("--cold")
    if args.before is not None:
        argv += ["--before", str(args.before)]
    if args.warm_digest_cache:
        argv.append("--warm-digest-cache")
    print(f"== {row.label}", file=sys.stderr, flush=True)
    bench_merge.main(argv)
    report = json.loads(report_path.read_text())
    reason = None
    if args.skip_peft:
        reason = "--skip-peft"
    elif row.quantize:
        reason = "fails: transformers cannot save a PEFT model merged into 4-bit"
    elif skip_peft:
        reason = f"skipped: needs > {peft_needs / 1e9:.0f} GB RAM"
    report["peft_skipped_because"] = reason
    return report


def table_rows(row: SuiteRow, report: dict[str, object]) -> list[list[str]]:
    cases = {case["name"]: case for case in report["cases"]}  # type: ignore[index]
    copy = cases[bench_merge.CP_CASE]
    peft = cases.get(bench_merge.PEFT_CASE)
    lines = []
    for name, case in cases.items():
        if not name.startswith(bench_merge.LORA_MERGE_CASE):
            continue
        failed = any(run["exit_code"] != 0 for run in case["runs"])
        label = row.label + name.removeprefix(bench_merge.LORA_MERGE_CASE)
        if failed:
            lines.append([label, "FAILED", *[bench_merge.NOT_APPLICABLE] * (len(COLUMNS) - 2)])
            continue
        peft_cells = [str(report["peft_skipped_because"]), bench_merge.NOT_APPLICABLE]
        if peft is not None and name == bench_merge.LORA_MERGE_CASE:
            peft_cells = [
                f"{peft['median_wall_s']:.2f}",
                bench_merge.format_mib(peft["peak_rss_bytes"]),
            ]
        elif name != bench_merge.LORA_MERGE_CASE:
            peft_cells = [bench_merge.NOT_APPLICABLE] * 2
        on_disk_ratio = case["median_on_disk_s"] / copy["median_on_disk_s"]
        target = row.target_ratio if name in TARGETED_CASES else None
        lines.append(
            [
                label,
                f"{case['median_wall_s']:.2f}",
                f"{copy['median_wall_s']:.2f}",
                f"{case['median_wall_s'] / copy['median_wall_s']:.2f}x",
                f"{on_disk_ratio:.2f}x",
                target_cell(target, on_disk_ratio, case["peak_rss_bytes"]),
                bench_merge.format_mib(case["peak_rss_bytes"]),
                f"{case['median_user_s']:.2f} + {case['median_system_s']:.2f}",
                *peft_cells,
            ]
        )
    return lines


# The default-flags runs, now and (with --before) from the earlier checkout.
TARGETED_CASES = (bench_merge.LORA_MERGE_CASE, bench_merge.BEFORE_CASE)


def target_cell(target: float | None, on_disk_ratio: float, peak_rss_bytes: int) -> str:
    """``<= 1.5x, 300 MB: met`` (or ``missed``), or n/a for rows without a target."""
    if target is None:
        return bench_merge.NOT_APPLICABLE
    met = on_disk_ratio <= target and peak_rss_bytes <= PEAK_RSS_TARGET_BYTES
    limit_mb = PEAK_RSS_TARGET_BYTES // (1024 * 1024)
    return f"<= {target:g}x, {limit_mb} MB: {'met' if met else 'missed'}"


def startup_section(repeat: int, before: Path | None) -> str:
    """The start-up table (bench_startup.py) and a verdict line per target.

    With ``before``, the earlier checkout's own ``lora-merge`` (its ``.venv`` beside
    ``src/``, if it has one) is timed in the same rounds.
    """
    baseline = None
    if before is not None:
        candidate = before.resolve().parent / ".venv" / "bin" / "lora-merge"
        baseline = str(candidate) if candidate.exists() else None
    print("== start-up", file=sys.stderr, flush=True)
    rows = bench_startup.measure_startup(repeat=repeat, baseline=baseline)
    lines = [bench_startup.startup_table(rows, repeat), ""]
    for row in rows:
        if row.label.endswith(("--version", "--help")):
            met = "met" if row.wall_seconds <= STARTUP_TARGET_S else "missed"
            lines.append(f"- `{row.label}`: {row.wall_seconds:.3f} s; target <= 0.3 s: {met}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[*(row.key for row in ROWS), STARTUP_KEY])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before every run (root)"
    )
    parser.add_argument("--workdir", type=Path, default=bench_merge.DEFAULT_WORKDIR)
    parser.add_argument(
        "--before",
        type=Path,
        metavar="SRC",
        help="also run an earlier checkout's src/ (e.g. `git worktree add ../before v0.1.0`, "
        "then --before ../before/src) in every row: before and after in the same run",
    )
    parser.add_argument(
        "--warm-digest-cache",
        action="store_true",
        help="re-run figures: lora-merge's digest cache filled by an untimed run first "
        "(default: empty before every run, first-run figures comparable with earlier tables)",
    )
    parser.add_argument("--json", type=Path, help="write every row's raw report here")
    args = parser.parse_args(argv)
    rows = [row for row in ROWS if not args.only or row.key in args.only]
    lines = [bench_merge.markdown_row(COLUMNS), bench_merge.markdown_row(["---"] * len(COLUMNS))]
    reports = {}
    with tempfile.TemporaryDirectory() as scratch:
        for row in rows:
            report = run_row(row, args, Path(scratch))
            reports[row.key] = report
            lines += [bench_merge.markdown_row(cells) for cells in table_rows(row, report)]
    environment = bench_merge.environment_summary()
    print(
        f"\nmedian of {args.repeat} run(s) per case; "
        f"{'page cache dropped' if args.cold else 'inputs read into the page cache'} before each run; "
        f"lora-merge's digest cache {'warm' if args.warm_digest_cache else 'empty'} "
        "before each run; "
        f"{json.dumps(environment)}"
    )
    if rows:
        print("\n".join(lines))
    if not args.only or STARTUP_KEY in args.only:
        print("\n" + startup_section(max(args.repeat, 10), args.before))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
