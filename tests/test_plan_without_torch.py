"""A plain LoRA merge is planned from JSON and safetensors headers, without torch (issue 24).

The plan's dtypes are :class:`lora_merge.dtypes.DType` values, torch-free. The
oracles: Python's ``-X importtime`` trace of a fresh process that plans (as
``tests/test_startup.py`` checks ``--help``), the safetensors library's own
reading of BASE (every planned tensor is BASE's, with its dtype and shape), and
torch's and safetensors' own dtypes for each :class:`DType`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_copy_ahead import untouched_names
from test_pinned_outputs import build_case
from test_startup import imported_modules, top_level

from lora_merge.dtypes import DTYPE_BY_SAFETENSORS_NAME, dtype_of

# Plans BASE and ADAPTER (argv) as a plain merge does, and prints each planned tensor.
PLAN_CODE = """
import json, sys
from pathlib import Path
from lora_merge.adapter.config import read_adapter_config
from lora_merge.adapter.keys import classify_adapter_keys
from lora_merge.adapter.weights import open_adapter_weights
from lora_merge.inputs.resolve import resolve_base
from lora_merge.plan.planner import build_merge_plan

base, adapter = Path(sys.argv[1]), Path(sys.argv[2])
checkpoint = resolve_base(base)
weights = open_adapter_weights(adapter / "adapter_model.safetensors")
config = read_adapter_config(adapter / "adapter_config.json")
contents = classify_adapter_keys(list(weights.keys()))
plan = build_merge_plan(checkpoint, config, contents, weights, None)
planned = [
    [t.spec.name, t.spec.dtype.name, list(t.spec.shape), t.is_byte_copy] for t in plan.tensors
]
print(json.dumps({"planned": planned, "torch": "torch" in sys.modules}))
"""


def stored_tensors(base: Path) -> dict[str, tuple[str, list[int]]]:
    """BASE's tensors as the safetensors library reads them: name -> (dtype name, shape)."""
    tensors = {}
    for shard in base.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                part = handle.get_slice(name)
                tensors[name] = (part.get_dtype(), part.get_shape())
    return tensors


@pytest.mark.parametrize("case", ["llama-bf16-qv", "llama-fp32-dora"])
def test_planning_a_plain_lora_merge_imports_no_torch(case: str, tmp_path: Path) -> None:
    base, adapter, _ = build_case(case, tmp_path)

    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PLAN_CODE, str(base), str(adapter)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    packages = top_level(imported_modules(result.stderr))
    assert "lora_merge" in packages, "the trace did not record lora_merge"
    assert packages & {"torch", "numpy", "safetensors"} == set()
    planned = json.loads(result.stdout)
    assert planned["torch"] is False
    # The plan is BASE's tensors, dtypes and shapes; the untouched ones are byte copies.
    tensors = {name: (dtype, shape) for name, dtype, shape, _ in planned["planned"]}
    assert tensors == stored_tensors(base)
    copies = {name for name, _, shape, copy in planned["planned"] if copy and shape != [0]}
    targets = tuple(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert copies == untouched_names(base, targets)


@pytest.mark.parametrize("name", sorted(DTYPE_BY_SAFETENSORS_NAME))
def test_each_dtype_is_torchs_and_safetensors_own(name: str, tmp_path: Path) -> None:
    dtype = DTYPE_BY_SAFETENSORS_NAME[name]
    torch_dtype = dtype.torch

    assert dtype.itemsize == torch_dtype.itemsize
    assert dtype.is_floating_point == torch_dtype.is_floating_point
    assert str(dtype) == str(torch_dtype)  # messages and plan fingerprints read as before
    assert dtype_of(torch_dtype) is dtype
    # The safetensors library names a tensor of this dtype as the plan does.
    path = tmp_path / "one.safetensors"
    save_file({"t": torch.zeros(2, dtype=torch_dtype)}, path)
    with safe_open(path, "pt") as handle:
        assert handle.get_slice("t").get_dtype() == name
