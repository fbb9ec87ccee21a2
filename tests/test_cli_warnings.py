"""The CLI's warning printer (issue 14): a program that calls ``lora_merge.cli.main()`` keeps
its own ``warnings.showwarning`` afterwards, whether the merge succeeds or is refused."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
from handmade_checkpoints import adapter_tensors
from safetensors.torch import save_file


@pytest.mark.parametrize("succeeds", [True, False], ids=["merged", "refused"])
def test_cli_main_gives_warnings_showwarning_back(
    handmade_inputs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    succeeds: bool,
) -> None:
    """A program that calls the CLI's main() keeps its own warning printer afterwards, and
    the run's own warning (a base-name mismatch) was printed as lora-merge's one line."""
    from lora_merge import cli

    base, adapter = handmade_inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    if not succeeds:  # NaN in A: refused while writing, after the warning (exit 7)
        tensors = adapter_tensors()
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = math.nan
        (adapter / "adapter_model.safetensors").unlink()
        save_file(tensors, adapter / "adapter_model.safetensors")

    def callers_printer(*args: object, **kwargs: object) -> None:
        raise AssertionError("lora-merge's own warning reached the caller's printer")

    monkeypatch.setattr(warnings, "showwarning", callers_printer)
    monkeypatch.setattr(sys, "argv", ["lora-merge", str(base), str(adapter), str(out), "-q"])
    with pytest.raises(SystemExit) as exit_status:
        cli.main()
    assert exit_status.value.code == (0 if succeeds else 7)
    assert warnings.showwarning is callers_printer
    assert "lora-merge: warning: the adapter was trained on 'someone/another-model'" in (
        capsys.readouterr().err
    )
