"""One DoRA marker for every refusal (issue 15): ``--unmerge`` and ``--combine`` tell a DoRA
adapter by the same key table, whichever way a tool spells the magnitude vector's key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runs import assert_nothing_written, assert_one_error_line, run_cli
from handmade_checkpoints import HIDDEN, adapter_tensors, write_adapter, write_base

from lora_merge import MergeOptions, merge
from lora_merge.errors import EXIT_INVALID_INPUT, InvalidInputError

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
# PEFT's save_pretrained, a live model's state_dict(), and a state_dict() that keeps the
# adapter name.
SPELLINGS = [
    ".lora_magnitude_vector",
    ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector.default.weight",
]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    write_base(tmp_path / "base", shards=1)
    return tmp_path / "base"


def _dora_adapter(folder: Path, spelling: str) -> str:
    """An adapter whose config does not say use_dora; only its file holds a magnitude vector."""
    tensors = adapter_tensors()
    key = f"{MODULE}{spelling}"
    tensors[key] = torch.ones(HIDDEN)
    write_adapter(folder, tensors)
    return key


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_unmerge_refuses_dora_by_any_spelling_of_its_key(
    base: Path, tmp_path: Path, spelling: str
) -> None:
    key = _dora_adapter(tmp_path / "dora", spelling)
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="--unmerge cannot undo a DoRA adapter") as refusal:
        merge(MergeOptions(base=base, adapter=tmp_path / "dora", out=out, unmerge=True))
    assert repr(key) in str(refusal.value)
    assert not out.exists()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_combine_refuses_dora_by_any_spelling_of_its_key(
    base: Path, tmp_path: Path, spelling: str
) -> None:
    key = _dora_adapter(tmp_path / "dora", spelling)
    write_adapter(tmp_path / "plain", adapter_tensors(seed=2))
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="DoRA adapters cannot be combined") as refusal:
        merge(MergeOptions(base=base, adapter=[tmp_path / "plain", tmp_path / "dora"], out=out))
    assert repr(key) in str(refusal.value)
    assert not out.exists()


def test_dora_adapter_by_its_config_is_refused_in_a_combination(
    two_handmade_adapters: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """use_dora in adapter_config.json is enough: DoRA cannot be combined (exit 4, nothing written)."""
    base, first, second = two_handmade_adapters
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    out = tmp_path / "out"
    result = run_cli(base, first, second, out, "-q")
    assert result.returncode == EXIT_INVALID_INPUT, result.stderr
    assert_one_error_line(result, str(second), "DoRA", "use_dora", "cannot be combined")
    assert_nothing_written(tmp_path, out)
