"""What scripts and CI steps rely on: the JSON summary, warnings on stderr, NO_COLOR."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

from handmade_checkpoints import write_adapter, write_base
from merge_process import LORA_MERGE

from lora_merge.inputs.identity import base_mismatch_warning

# SGR parameters that set a colour: 30-37, 38 (extended), 40-47, 48, 90-97, 100-107.
COLOUR_SGR = re.compile(rb"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_adapter_trained_on_another_base_is_a_warning_not_silence(tmp_path: Path) -> None:
    """base_model_name_or_path naming another model: one warning line on stderr, the merge goes on."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    result = run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "--json")
    assert result.returncode == 0, result.stderr
    warnings = [
        line for line in result.stderr.splitlines() if line.startswith("lora-merge: warning: ")
    ]
    assert len(warnings) == 1
    assert "'meta-llama/Llama-2-7b-hf'" in warnings[0] and "merging anyway" in warnings[0]
    assert json.loads(result.stdout)["warnings"] == [
        warnings[0].removeprefix("lora-merge: warning: ")
    ]


def test_adapter_trained_on_this_base_gives_no_warning(tmp_path: Path) -> None:
    """The same model name (Hub id vs local folder of that name) is not a mismatch."""
    write_base(tmp_path / "Llama-2-7b-hf")
    write_adapter(tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    result = run_cli(
        tmp_path / "Llama-2-7b-hf", tmp_path / "adapter", tmp_path / "merged", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert json.loads(result.stdout)["warnings"] == []


def test_names_of_a_hub_snapshot_and_its_config_count_as_the_base(tmp_path: Path) -> None:
    """A cache snapshot is named by its repo; config.json's _name_or_path counts too."""
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc"
    assert base_mismatch_warning("org/tiny", "org/tiny@abc", snapshot, {}) is None
    assert (
        base_mismatch_warning(
            "Org/Tiny", str(tmp_path / "x"), tmp_path / "x", {"_name_or_path": "org/tiny"}
        )
        is None
    )
    assert base_mismatch_warning(None, "anything", tmp_path, {}) is None
    assert base_mismatch_warning("org/other", "org/tiny", snapshot, {}) is not None


def test_json_summary_describes_inputs_outputs_and_timings(tmp_path: Path) -> None:
    """--json: one object on stdout with the resolved inputs, the files written, modules by layer, timings."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    result = run_cli(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "merged",
        "--json",
        "--max-shard-size",
        "30KB",
    )
    summary = json.loads(result.stdout)
    assert Path(summary["base"]) == (tmp_path / "base").resolve()
    assert Path(summary["adapter"]) == (tmp_path / "adapter").resolve()
    assert summary["files"] == sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert "model.safetensors.index.json" in summary["files"]
    assert summary["lora_modules_by_layer"] == {"linear": 4}
    assert 0 <= summary["plan_seconds"] <= summary["seconds"]
    assert 0 <= summary["write_seconds"] <= summary["seconds"]


def _help_on_a_terminal(extra_env: dict[str, str]) -> bytes:
    master, slave = pty.openpty()
    inherited = {name: value for name, value in os.environ.items() if name != "NO_COLOR"}
    env = {**inherited, "COLUMNS": "100", **extra_env}
    process = subprocess.Popen([LORA_MERGE, "--help"], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=60)
    os.close(master)
    return output


def test_no_color_removes_colour_from_the_terminal_output() -> None:
    """On a terminal, --help is coloured; with NO_COLOR set it has no colour codes (bold may stay)."""
    assert COLOUR_SGR.search(_help_on_a_terminal({}))
    assert not COLOUR_SGR.search(_help_on_a_terminal({"NO_COLOR": "1"}))
