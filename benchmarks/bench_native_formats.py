"""FP8 block-wise, MXFP4 and INT4 bases merged side by side with the bf16 base of the same shapes.

For each family (a DeepSeek-V3-shaped slice in block-wise FP8; a gpt-oss-shaped
model with MXFP4 experts) the script builds, with
``synthetic_native_checkpoints.py``, the quantized base, its bf16 twin (the
same tensors as transformers dequantizes them) and one LoRA adapter, then runs
``lora-merge`` on each, the runs of all cases interleaved ``--repeats`` times
so that a noisy machine slows every case alike. It prints a markdown table:
median wall time, peak RSS (the child's ``ru_maxrss``), output size, and the
ratio of each quantized run's wall time to the bf16 merge's (the target:
at most 1.3x for FP8 and MXFP4 to bf16, 1.5x for INT4). The INT4 family
(``synthetic_int_checkpoints.py``: a Llama-shaped model, every linear INT4 with
groups of 128, as compressed-tensors pack-quantized, GPTQ and AWQ GEMM) is merged
to 16-bit only: re-quantizing INT4 needs calibration (``--int-shape none`` skips it).

Usage::

    .venv/bin/python benchmarks/bench_native_formats.py --workdir .bench/native
    .venv/bin/python benchmarks/bench_native_formats.py --workdir /data/native \\
        --deepseek-shape deepseek-v3 --layers 3 --gpt-oss-shape gpt-oss-20b --repeats 1

The real widths on a small disk (4.5 GB of inputs; decoding timed at the rows
the released models have, with fewer experts, layers and a small vocabulary)::

    .venv/bin/python benchmarks/bench_native_formats.py --workdir .bench/widths \\
        --deepseek-shape deepseek-v3-widths --layers 1 \\
        --gpt-oss-shape gpt-oss-20b-widths --gpt-oss-layers 1 \\
        --int-shape llama-8b --int-layers 1 --skip-native

``--compare-src DIR`` also runs every quantized case with ``lora_merge`` imported
from ``DIR`` (an older checkout's ``src``), in the same interleaved run: before and
after a change, measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import child_environment, run_measured, tree_size_bytes

REPOSITORY = Path(__file__).resolve().parent.parent
GENERATOR = Path(__file__).resolve().parent / "synthetic_native_checkpoints.py"
INT_GENERATOR = Path(__file__).resolve().parent / "synthetic_int_checkpoints.py"
INT_FORMATS = ("compressed-tensors", "gptq", "awq")


@dataclass
class Case:
    family: str
    label: str
    base: Path
    adapter: Path
    save_method: str = "merged_16bit"
    baseline: Case | None = None
    source: Path | None = None  # lora_merge imported from here (--compare-src), else installed
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    output_bytes: int = 0

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)


def build(
    shape: str, layers: int | None, fmt: str, workdir: Path, generator: Path = GENERATOR
) -> dict:
    argv = [sys.executable, str(generator), "--shape", shape]
    argv += [] if layers is None else ["--layers", str(layers)]
    argv += ["--format", fmt, "--workdir", str(workdir)]
    result = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def cases(args: argparse.Namespace) -> list[Case]:
    found = []
    families = (
        ("DeepSeek-V3 slice, FP8 block", args.deepseek_shape, "fp8"),
        ("gpt-oss, MXFP4 experts", args.gpt_oss_shape, "mxfp4"),
    )
    for family, shape, quantized in () if args.only_int else families:
        layers = args.layers if quantized == "fp8" else args.gpt_oss_layers
        plain = build(shape, layers, "bf16", args.workdir)
        packed = build(shape, layers, quantized, args.workdir)
        baseline = Case(family, "bf16 base", Path(plain["base"]), Path(plain["adapter"]))
        found.append(baseline)
        methods = ("merged_16bit",) if args.skip_native else ("merged_16bit", "merged_native")
        for method in methods:
            label = f"{quantized} base -> {'bf16' if method == 'merged_16bit' else quantized}"
            found.append(
                Case(family, label, Path(packed["base"]), Path(packed["adapter"]), method, baseline)
            )
    if args.int_shape != "none":
        family = f"{args.int_shape} x{args.int_layers}, INT4 g128"
        plain = build(args.int_shape, args.int_layers, "bf16", args.workdir, INT_GENERATOR)
        baseline = Case(family, "bf16 base", Path(plain["base"]), Path(plain["adapter"]))
        found.append(baseline)
        for fmt in INT_FORMATS:
            packed = build(args.int_shape, args.int_layers, fmt, args.workdir, INT_GENERATOR)
            label = f"{fmt} int4 base -> 16-bit"
            found.append(
                Case(
                    family, label, Path(packed["base"]), Path(packed["adapter"]), baseline=baseline
                )
            )
    if args.compare_src is not None:
        # The same quantized runs with another lora_merge (e.g. the code before a change),
        # interleaved with the others so that a shared machine's load falls on both alike.
        found += [
            replace(
                case,
                label=f"{case.label} [{args.compare_label}]",
                source=args.compare_src,
                walls=[],
                cpus=[],
                rss=[],
            )
            for case in list(found)
            if case.baseline is not None
        ]
    return found


def run(case: Case, args: argparse.Namespace, index: int) -> None:
    out = args.workdir / f"out-{index}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(REPOSITORY / ".venv/bin/lora-merge"), str(case.base), str(case.adapter), str(out)]
    argv += ["--save-method", case.save_method, "--quiet"]
    environment = child_environment(case.source)
    figures = run_measured(argv, environment, args.workdir / f"log-{index}", None, 0)
    if not figures.succeeded:
        raise SystemExit(f"{case.label}: {figures.last_stderr_line}")
    case.walls.append(figures.wall_s)
    case.cpus.append(figures.user_s + figures.system_s)
    case.rss.append(figures.max_rss_bytes)
    case.output_bytes = tree_size_bytes(out)
    shutil.rmtree(out)


def table(found: list[Case]) -> str:
    lines = [
        "| model | run | wall (median) | vs bf16 merge | CPU-s (median) | CPU-s vs bf16 "
        "| peak RSS | output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in found:
        ratio = "1.00x" if case.baseline is None else f"{case.wall / case.baseline.wall:.2f}x"
        cpu_ratio = "1.00x" if case.baseline is None else f"{case.cpu / case.baseline.cpu:.2f}x"
        lines.append(
            f"| {case.family} | {case.label} | {case.wall:.2f} s | {ratio} | "
            f"{case.cpu:.2f} s | {cpu_ratio} | "
            f"{max(case.rss) / 2**20:.0f} MiB | {case.output_bytes / 2**20:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--deepseek-shape", default="deepseek-v3-mini")
    parser.add_argument("--gpt-oss-shape", default="gpt-oss-mini")
    parser.add_argument("--layers", type=int, default=4, help="DeepSeek MoE layers")
    parser.add_argument(
        "--gpt-oss-layers", type=int, default=None, help="gpt-oss layers (default: the shape's)"
    )
    parser.add_argument(
        "--int-shape", default="llama-1b", help="synthetic_int_checkpoints.py shape, or none"
    )
    parser.add_argument("--int-layers", type=int, default=4)
    parser.add_argument("--only-int", action="store_true", help="skip the FP8 and MXFP4 families")
    parser.add_argument(
        "--skip-native", action="store_true", help="merge to 16-bit only (no merged_native runs)"
    )
    parser.add_argument(
        "--compare-src",
        type=Path,
        default=None,
        help="also run each quantized case with lora_merge imported from this src folder "
        "(e.g. `git archive COMMIT src | tar -x -C DIR`, then DIR/src), interleaved",
    )
    parser.add_argument("--compare-label", default="other src", help="its label in the table")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    found = cases(args)
    for _ in range(args.repeats):
        for index, case in enumerate(found):
            run(case, args, index)
    print(table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
