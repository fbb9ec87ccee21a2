"""NF4/FP4 dequantization throughput: bitsandbytes' CPU kernel, lora-merge's torch path, floors.

lora-merge dequantizes a 4-bit base tile by tile (``io/dequantizing_reader.py``).
This benchmark reads every quantized weight of a 4-bit checkpoint the way the
merge does (tiles of 512 KiB of float32 workspace, on one thread, as each of the
merge's threads does) with each implementation, then times the kernels alone on
one tile and the floors they are measured against::

    .venv/bin/python benchmarks/bench_dequantize.py BASE [--runs 3]

BASE is a bitsandbytes 4-bit checkpoint (``bench_merge.py --quantize nf4`` builds
one next to the 16-bit benchmark model, or ``tests/support/bnb_checkpoints.py SRC DST
--quant-type nf4 --double-quant``). Figures are GB/s of 16-bit output on one
thread, medians of ``--runs`` rounds taken in turn, and the ratio of each to
the first row; on a shared machine quote the ratios. The floors:

- ``copy, tile in cache``: one pass writing a tile's output from a cached buffer,
  what the cheapest possible dequantization (a single pass) costs;
- ``copy, from memory``: a copy of 256 MiB, the machine's memory bandwidth;
- ``gather alone``: the table lookup of each byte's two values, without the
  scaling and the rounding.

It also times what bitsandbytes costs before its first kernel runs (``import
bitsandbytes.functional`` in a fresh process, after torch) and its resident memory.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from lora_merge.compute import bitsandbytes_backend  # noqa: E402
from lora_merge.compute.dequantize import (  # noqa: E402
    DequantizeWorkspace,
    code_pair_table,
    dequantize_4bit,
)
from lora_merge.inputs.resolve import resolve_base  # noqa: E402
from lora_merge.io.dequantizing_reader import DequantizingReader  # noqa: E402
from lora_merge.io.reader import SafetensorsReader  # noqa: E402

# The merge's CPU tile: bytes of float32 workspace (stream/executor.py CPU_TILE_WORKSPACE_BYTES).
TILE_WORKSPACE_BYTES = 2**19
MEMORY_COPY_BYTES = 2**28
BLOCKSIZE = 64
IMPORT_PROBE = """
import os, time, torch


def resident_bytes():
    # The current resident set (Linux); the peak (ru_maxrss) can hide the growth when
    # importing torch peaked higher.
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


before = resident_bytes()
start = time.perf_counter()
import bitsandbytes.functional
seconds = time.perf_counter() - start
print(seconds, resident_bytes() - before)
"""


def read_all_weights(base_folder: Path, backend: str) -> tuple[int, float]:
    """Elements dequantized and CPU seconds to read every 4-bit weight tile by tile."""
    base = resolve_base(base_folder)
    keys = [key for key, tensor in base.tensors.items() if tensor.quantized is not None]
    buffer = torch.empty(TILE_WORKSPACE_BYTES, dtype=torch.uint8)
    elements = 0
    with DequantizingReader(SafetensorsReader(base.entries), base.tensors, "cpu", backend) as r:
        r.read_rows(keys[0], 0, 1, buffer)  # bitsandbytes' import is timed apart
        start = time.process_time()
        for key in keys:
            shape = base.tensors[key].shape
            rows = max(1, TILE_WORKSPACE_BYTES // (4 * shape[1]))
            for first in range(0, shape[0], rows):
                elements += r.read_rows(key, first, min(shape[0], first + rows), buffer).numel()
        return elements, time.process_time() - start


def best_seconds(call: Callable[[], object], repeats: int = 50, rounds: int = 7) -> float:
    """The fastest mean time of ``call`` over ``rounds`` rounds of ``repeats`` calls."""
    call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def kernel_rows(functional: object | None) -> list[tuple[str, float]]:
    """GB/s of bf16 output of the kernels alone and of the floors, on one tile."""
    count = TILE_WORKSPACE_BYTES // 4
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (count // 2,), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(count // BLOCKSIZE, generator=generator)
    out = torch.empty(count, dtype=torch.bfloat16)
    workspace = DequantizeWorkspace()
    cached = torch.zeros(count, dtype=torch.bfloat16)
    table = code_pair_table("nf4")
    indices = packed.int()
    pairs = torch.empty(count // 2, dtype=torch.int64)
    big_source = torch.zeros(MEMORY_COPY_BYTES, dtype=torch.uint8)
    big_target = torch.empty(MEMORY_COPY_BYTES, dtype=torch.uint8)
    tile_bytes = 2 * count

    def ours() -> object:
        return dequantize_4bit(
            packed, absmax, "nf4", BLOCKSIZE, count, torch.bfloat16, out, workspace
        )

    rows = []
    if functional is not None:

        def theirs() -> object:
            return bitsandbytes_backend.dequantize_4bit_with_bitsandbytes(
                packed, absmax, "nf4", BLOCKSIZE, count, torch.bfloat16
            )

        rows.append(("kernel: bitsandbytes dequantize_4bit", tile_bytes / best_seconds(theirs)))
    rows.append(("kernel: lora-merge dequantize_4bit", tile_bytes / best_seconds(ours)))
    rows.append(
        (
            "floor: gather alone",
            tile_bytes / best_seconds(lambda: torch.index_select(table, 0, indices, out=pairs)),
        )
    )
    rows.append(
        ("floor: copy, tile in cache", tile_bytes / best_seconds(lambda: out.copy_(cached)))
    )
    rows.append(
        (
            "floor: copy, from memory",
            MEMORY_COPY_BYTES / best_seconds(lambda: big_target.copy_(big_source), 3, 3),
        )
    )
    return rows


def import_cost() -> tuple[float, int] | None:
    """Seconds and resident bytes ``import bitsandbytes.functional`` adds after torch."""
    probe = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return None
    seconds, resident = probe.stdout.split()
    return float(seconds), int(resident)


def print_table(title: str, rows: list[tuple[str, float]]) -> None:
    print(f"\n{title}")
    print(f"| {'implementation':<44} | {'GB/s out':>9} | {'vs first':>8} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 10}|")
    for name, rate in rows:
        print(f"| {name:<44} | {rate / 1e9:>9.2f} | {rate / rows[0][1]:>7.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="a bitsandbytes 4-bit checkpoint folder")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the merge's threads each dequantize single-threaded
    functional = bitsandbytes_backend.load_bitsandbytes()
    backends = (["bitsandbytes"] if functional is not None else []) + ["torch"]
    seconds: dict[str, list[float]] = {backend: [] for backend in backends}
    elements = 0
    for _ in range(args.runs):
        for backend in backends:
            elements, cpu = read_all_weights(args.base, backend)
            seconds[backend].append(cpu)
    names = {"bitsandbytes": "reader: bitsandbytes kernels", "torch": "reader: lora-merge torch"}
    reader_rows = [
        (names[backend], 2 * elements / statistics.median(seconds[backend])) for backend in backends
    ]
    print(f"{elements / 1e9:.3f} G weights of {args.base.name}, one thread")
    print_table("Every 4-bit weight, tile by tile (reads included; CPU seconds)", reader_rows)
    for backend in backends:
        print(f"  {names[backend]}: {statistics.median(seconds[backend]):.2f} CPU s (median)")
    print_table("One tile, kernels and floors (best of 7)", kernel_rows(functional))
    cost = import_cost()
    if cost is not None:
        print(
            f"\nimport bitsandbytes.functional after torch: {cost[0]:.2f} s, "
            f"+{cost[1] / 2**20:.0f} MiB resident"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
