"""Run lora-merge on a Ray cluster: one merge split into parts, or a fleet of merges.

Usage:
    # One merge in N parts (one Ray task each), then the final step (one more task):
    python examples/ray_merge.py parts BASE ADAPTER OUT --parts N [-- LORA_MERGE_OPTIONS...]

    # A fleet: one task per merge, each a whole lora-merge run; prints one --json summary a line:
    python examples/ray_merge.py fleet --merge BASE ADAPTER OUT [--merge ...] [-- OPTIONS...]

    --address ADDRESS joins a running cluster (``ray start --head`` on one machine,
    ``ray start --address ...`` on the others); without it Ray starts a local one.

Each task runs the ``lora-merge`` command (``python -m lora_merge``) in a
subprocess on whichever worker Ray picks, so a task's failure is its exit code
and one error line, never a crash of the driver. In ``parts`` mode every
worker must see BASE, ADAPTER and OUT's parent folder at the same paths (a
shared file system: NFS, Lustre, a mounted bucket), because the parts write
into one staging area beside OUT; the final step is the same command without
``--part``, with ``--resume``, and it computes any shard a failed part did not
write. A fleet needs no shared folder beyond where each merge reads and writes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import ray

# lora-merge's options that each part and the final step must share are the
# caller's; --json gives a summary to collect and -q keeps the logs short.
COLLECTED = ("--json", "-q")


@dataclass
class MergeResult:
    """What one lora-merge run on a worker returned.

    Attributes:
        command: the arguments after ``lora-merge``.
        returncode: its exit code (see the README's exit-code table).
        summary: its ``--json`` summary, or None when it failed.
        error: its stderr (one ``lora-merge: error: ...`` line when it failed).
    """

    command: list[str]
    returncode: int
    summary: dict[str, Any] | None
    error: str


def run_lora_merge(arguments: list[str]) -> MergeResult:
    """Run ``lora-merge ARGUMENTS --json -q`` here, and collect its summary."""
    command = [*arguments, *COLLECTED]
    completed = subprocess.run(
        [sys.executable, "-m", "lora_merge", *command], capture_output=True, text=True
    )
    summary = json.loads(completed.stdout) if completed.returncode == 0 else None
    return MergeResult(command, completed.returncode, summary, completed.stderr.strip())


# One CPU each: a merge streams with bounded memory; raise num_cpus to give each more threads.
run_lora_merge_task = ray.remote(num_cpus=1)(run_lora_merge)


def merge_in_parts(
    base: str, adapter: str, out: str, parts: int, options: list[str]
) -> tuple[list[MergeResult], MergeResult]:
    """Run ``--part I/N`` for every I as Ray tasks, then the final ``--resume`` step as one more.

    The final step runs even if a part failed: it keeps the shards the parts
    finished (checked against their sha256) and computes the rest itself.

    Returns:
        Each part's result, in order, and the final step's (whose summary says,
        in ``computed_shards``, how many shards no part produced).
    """
    command = [base, adapter, out, *options]
    pending = [
        run_lora_merge_task.remote([*command, "--part", f"{i}/{parts}"]) for i in range(parts)
    ]
    part_results: list[MergeResult] = ray.get(pending)
    final: MergeResult = ray.get(run_lora_merge_task.remote([*command, "--resume"]))
    return part_results, final


def merge_fleet(merges: list[tuple[str, str, str]], options: list[str]) -> list[MergeResult]:
    """Run every ``(BASE, ADAPTER, OUT)`` merge as its own Ray task; results in the given order."""
    pending = [run_lora_merge_task.remote([b, a, o, *options]) for b, a, o in merges]
    results: list[MergeResult] = ray.get(pending)
    return results


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's arguments, and the lora-merge options given after ``--``."""
    options: list[str] = []
    if "--" in argv:
        options = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="a running Ray cluster to join (default: start one)")
    modes = parser.add_subparsers(dest="mode", required=True)
    parts = modes.add_parser("parts", help="one merge split into N Ray tasks, then the final step")
    parts.add_argument("base")
    parts.add_argument("adapter")
    parts.add_argument("out")
    parts.add_argument("--parts", type=int, required=True, help="N, the number of parts")
    fleet = modes.add_parser("fleet", help="many merges, one Ray task each")
    fleet.add_argument(
        "--merge", nargs=3, action="append", required=True, metavar=("BASE", "ADAPTER", "OUT")
    )
    return parser.parse_args(argv), options


def main(argv: list[str]) -> int:
    """Run the mode asked for; print one JSON line per lora-merge run; 1 if any run failed."""
    args, options = _arguments(argv)
    # A cluster already started in this process (a notebook, a test) is used as it is.
    ray.init(address=args.address, include_dashboard=False, ignore_reinit_error=True)
    if args.mode == "parts":
        part_results, final = merge_in_parts(args.base, args.adapter, args.out, args.parts, options)
        results = [*part_results, final]
        failed = final.returncode != 0
    else:
        results = merge_fleet([tuple(m) for m in args.merge], options)
        failed = any(r.returncode != 0 for r in results)
    for result in results:
        print(json.dumps(asdict(result)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
