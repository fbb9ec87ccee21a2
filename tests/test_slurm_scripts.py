"""examples/slurm/: the job-array script and the final job, run as Slurm would run them.

Slurm runs a batch script with bash, in the submit directory, with SLURM_* variables
describing the job; the ``#SBATCH`` lines are comments to bash. These tests do the
same for every array task id (in reverse order: tasks run in any order), then the
final job, and compare OUT by sha256 with one plain run of the final command.
``submit.sh`` is run against a stand-in ``sbatch`` that records what it was asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from handmade_checkpoints import write_big_base_and_adapter

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("bash") is None,
    reason="Slurm runs on Linux and Unix clusters; its job scripts are bash scripts",
)

SLURM = Path(__file__).resolve().parents[1] / "examples" / "slurm"
BIN = str(Path(sys.executable).parent)
OPTIONS = ["--dtype", "bf16", "--max-shard-size", "300kB", "--json"]
ARRAY_JOB_ID = "4242"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def slurm_environment(submit_dir: Path, **variables: str) -> dict[str, str]:
    """What a compute node's job sees: the submitter's environment plus Slurm's variables."""
    environment = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    environment.update(
        SLURM_SUBMIT_DIR=str(submit_dir), SLURM_CPUS_PER_TASK="4", SLURM_NNODES="1", **variables
    )
    return environment


def run_job(script: str, environment: dict[str, str], *arguments: object):
    return subprocess.run(
        ["bash", str(SLURM / script), *map(str, arguments)],
        env=environment,
        cwd=environment["SLURM_SUBMIT_DIR"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def array_task(task_id: int, count: int, submit_dir: Path) -> dict[str, str]:
    return slurm_environment(
        submit_dir,
        SLURM_JOB_NAME="lora-merge-part",
        SLURM_JOB_ID=str(int(ARRAY_JOB_ID) + 1 + task_id),
        SLURM_ARRAY_JOB_ID=ARRAY_JOB_ID,
        SLURM_ARRAY_TASK_ID=str(task_id),
        SLURM_ARRAY_TASK_COUNT=str(count),
        SLURM_ARRAY_TASK_MIN="0",
        SLURM_ARRAY_TASK_MAX=str(count - 1),
        SLURM_ARRAY_TASK_STEP="1",
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_big_base_and_adapter(tmp_path_factory.mktemp("slurm"), tensors=12, side=256)


def test_job_array_then_final_job_match_one_run(inputs, tmp_path):
    base, adapter = inputs
    out, reference = tmp_path / "merged", tmp_path / "one-run"
    one_run = subprocess.run(
        [Path(BIN) / "lora-merge", base, adapter, reference, *OPTIONS, "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_run.returncode == 0, one_run.stderr

    count = 3
    for task_id in reversed(range(count)):
        result = run_job("merge_part.sbatch", array_task(task_id, count, tmp_path), base, adapter, out, *OPTIONS)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["part"] == f"{task_id}/{count}"
    assert not out.exists()

    final_job = slurm_environment(tmp_path, SLURM_JOB_NAME="lora-merge-finish", SLURM_JOB_ID="4246")
    result = run_job("finish.sbatch", final_job, base, adapter, out, *OPTIONS)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["resumed_shards"], summary["computed_shards"]) == (6, 0)
    assert digest(out) == digest(reference)


def test_a_part_outside_a_job_array_refuses_to_run(inputs, tmp_path):
    base, adapter = inputs
    result = run_job(
        "merge_part.sbatch", slurm_environment(tmp_path), base, adapter, tmp_path / "m"
    )
    assert result.returncode != 0
    assert "job array" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_submit_sh_submits_the_array_then_the_final_job_after_it(tmp_path):
    """submit.sh asks sbatch for --array=0-(N-1) and a final job with --dependency=afterok."""
    fake_bin, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    fake_bin.mkdir()
    sbatch = fake_bin / "sbatch"
    sbatch.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> "{calls}"\n'
        f'if [ "$(wc -l < "{calls}")" -eq 1 ]; then echo "{ARRAY_JOB_ID};cluster"; else echo 4300; fi\n'
    )
    sbatch.chmod(0o755)
    environment = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", str(SLURM / "submit.sh"), "4", "org/base", "org/adapter", "/shared/merged", "--dtype", "bf16"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    array_call, final_call = calls.read_text().splitlines()
    assert array_call == (
        f"--parsable --array=0-3 --export=ALL,LORA_MERGE_PARTS=4 {SLURM}/merge_part.sbatch "
        "org/base org/adapter /shared/merged --dtype bf16"
    )
    assert final_call == (
        f"--parsable --dependency=afterok:{ARRAY_JOB_ID} {SLURM}/finish.sbatch "
        "org/base org/adapter /shared/merged --dtype bf16"
    )
    assert f"job array {ARRAY_JOB_ID} (4 tasks); final step: job 4300" in result.stdout
