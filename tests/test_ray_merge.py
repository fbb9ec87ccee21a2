"""examples/ray_merge.py on a local Ray cluster: parts then the final step, and a fleet.

The oracle is a plain run of the same ``lora-merge`` command in this process's
environment, without Ray: every file of OUT must match it by sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import write_big_base_and_adapter
from safetensors.torch import save_file

ray = pytest.importorskip(
    "ray", reason="ray publishes no wheel for this platform or Python (pyproject.toml's test extra)"
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_merge.py"
OPTIONS = ["--dtype", "bf16", "--max-shard-size", "300kB"]
EXIT_INPUT_NOT_FOUND = 3


def load_example():
    spec = importlib.util.spec_from_file_location("ray_merge", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    # Ray's workers cannot import an example script: ship its functions by value, as Ray
    # does for a script run as __main__ (`python examples/ray_merge.py ...`).
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def plain_run(*arguments: object) -> dict[str, str]:
    """OUT's files from ``lora-merge ARGUMENTS --json -q`` run here, without Ray."""
    command = [sys.executable, "-m", "lora_merge", *map(str, arguments), "--json", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return digest(Path(json.loads(result.stdout)["out"]))


@pytest.fixture(scope="module")
def ray_merge():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield load_example()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_big_base_and_adapter(tmp_path_factory.mktemp("ray"), tensors=12, side=256)


def test_parts_on_ray_then_final_step_match_one_run(ray_merge, inputs, tmp_path, capsys):
    """main() in parts mode: 3 part tasks and the final task; OUT identical to one run."""
    base, adapter = inputs
    out = tmp_path / "merged"
    expected = plain_run(base, adapter, tmp_path / "one-run", *OPTIONS, "--resume")

    code = ray_merge.main(
        ["parts", str(base), str(adapter), str(out), "--parts", "3", "--", *OPTIONS]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, lines
    *parts, final = lines
    assert [p["summary"]["part"] for p in parts] == ["0/3", "1/3", "2/3"]
    assert sum(p["summary"]["shards"] for p in parts) == final["summary"]["shards"] == 6
    assert final["summary"]["computed_shards"] == 0
    assert digest(out) == expected


def test_a_fleet_runs_one_task_per_merge_and_collects_summaries(ray_merge, inputs, tmp_path):
    """Two adapters on one base, and a merge whose adapter is missing: each gets its result."""
    base, adapter = inputs
    other = tmp_path / "other-adapter"
    other.mkdir()
    prefix = "base_model.model.model.layers.5.mlp.up_proj"
    generator = torch.Generator().manual_seed(7)
    lora = {
        f"{prefix}.lora_A.weight": torch.randn(4, 256, generator=generator),
        f"{prefix}.lora_B.weight": torch.randn(256, 4, generator=generator),
    }
    save_file(lora, other / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    (other / "adapter_config.json").write_text(json.dumps(config))
    merges = [
        (str(base), str(adapter), str(tmp_path / "out-a")),
        (str(base), str(other), str(tmp_path / "out-b")),
        (str(base), str(tmp_path / "missing"), str(tmp_path / "out-c")),
    ]
    results = ray_merge.merge_fleet(merges, OPTIONS)

    assert [r.returncode for r in results] == [0, 0, EXIT_INPUT_NOT_FOUND]
    assert results[2].summary is None and results[2].error.startswith("lora-merge: error: ")
    assert not (tmp_path / "out-c").exists()
    for (b, a, o), result in zip(merges[:2], results[:2], strict=True):
        assert Path(result.summary["out"]) == Path(o)
        assert digest(Path(o)) == plain_run(b, a, tmp_path / f"plain-{Path(o).name}", *OPTIONS)
