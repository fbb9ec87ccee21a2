"""--dry-run plans without writing; --verify catches a wrong output before OUT appears; runs repeat bit for bit."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import write_adapter, write_base
from merge_process import LORA_MERGE

import lora_merge.io.shard_writer as shard_writer
import lora_merge.stream.tiles as tiles
from lora_merge import MergeOptions, merge
from lora_merge.errors import VerificationError

EXIT_VERIFICATION_FAILED = 8


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_dry_run_writes_nothing_and_reports_what_the_merge_then_does(inputs, tmp_path):
    """The plan printed by --dry-run (JSON) matches the merge that follows, and OUT stays absent."""
    base, adapter = inputs
    before = digests(base) | digests(adapter)
    preview = run_cli(
        base, adapter, tmp_path / "merged", "--dry-run", "--json", "--max-shard-size", "30KB"
    )
    assert preview.returncode == 0, preview.stderr
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged*"))
    plan = json.loads(preview.stdout)

    done = run_cli(base, adapter, tmp_path / "merged", "--json", "--max-shard-size", "30KB")
    summary = json.loads(done.stdout)
    assert plan["lora_modules_by_layer"] == {"linear": summary["lora_modules"]} == {"linear": 4}
    assert plan["scales"] == {"2": 4}  # alpha 8 / r 4
    assert plan["copied"] == summary["copied"]
    assert plan["output_bytes"] == summary["bytes_written"]
    written = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert sorted(plan["output_shards"]) == written
    assert plan["disk_free_bytes"] > plan["output_bytes"]
    assert digests(base) | digests(adapter) == before


def test_dry_run_text_report_names_each_aspect(inputs, tmp_path):
    """Without --json the report is one labelled line per aspect, on stdout."""
    base, adapter = inputs
    result = run_cli(base, adapter, tmp_path / "merged", "--dry-run", "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "dry run: nothing was written"
    labels = [line.split()[0] for line in lines[1:]]
    assert labels == [
        "base",
        "adapter",
        "modules",
        "scales",
        "tensors",
        "dtype",
        "vocab",
        "output",
        "memory",
        "disk",
    ]
    assert "-> " in result.stdout and "float16" in next(
        line for line in lines if line.startswith("dtype")
    )


def test_dry_run_refuses_what_the_merge_would_refuse(inputs, tmp_path):
    """A mismatch is caught by the dry run with the merge's own exit code."""
    base, adapter = inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "LOHA"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli(base, adapter, tmp_path / "merged", "--dry-run").returncode == 4


def test_verify_passes_on_a_correct_merge(inputs, tmp_path):
    """--verify on a real merge: exit 0, OUT complete."""
    base, adapter = inputs
    result = run_cli(base, adapter, tmp_path / "merged", "--verify", "--max-shard-size", "30KB")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()


def test_verify_catches_a_wrong_merged_row(inputs, tmp_path, monkeypatch):
    """A merge kernel that is off by a little in one row is caught, and OUT never appears."""
    base, adapter = inputs
    original = tiles.merged_rows

    def slightly_wrong(base_rows, factors, start, workspace=None):
        merged = original(base_rows, factors, start, workspace)
        if start == 0:
            merged[0] += 0.25
        return merged

    monkeypatch.setattr(tiles, "merged_rows", slightly_wrong)
    options = MergeOptions(
        base=base, adapter=adapter, out=tmp_path / "merged", quiet=True, verify=True
    )
    with pytest.raises(VerificationError, match="row 0 of"):
        merge(options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    monkeypatch.setattr(tiles, "merged_rows", original)
    merge(options)  # the same merge, kernel restored, verifies


def test_verify_catches_a_copied_tensor_that_differs_from_base(inputs, tmp_path, monkeypatch):
    """A byte copy that went wrong (one flipped byte) is caught by comparing hashes with BASE."""
    base, adapter = inputs
    original = shard_writer.TensorSlot.copy_from

    def copy_then_flip(self, reader, key):
        position = self._position
        copied = original(self, reader, key)
        entry = reader.entry(key)
        with open(entry.path, "rb") as source:
            source.seek(entry.start)
            first = source.read(1)[0]
        with open(self._shard.path, "r+b") as shard:  # a second handle on the shard
            shard.seek(position)
            shard.write(bytes([first ^ 1]))
        return copied

    monkeypatch.setattr(shard_writer.TensorSlot, "copy_from", copy_then_flip)
    options = MergeOptions(
        base=base, adapter=adapter, out=tmp_path / "merged", quiet=True, verify=True
    )
    with pytest.raises(VerificationError, match="differs from BASE's bytes"):
        merge(options)
    assert not (tmp_path / "merged").exists()


def test_verify_failure_is_documented_as_exit_8() -> None:
    """A failed verification maps to exit 8, and --help says so."""
    assert VerificationError("x").exit_code == EXIT_VERIFICATION_FAILED
    result = run_cli("--help")
    assert "8 --verify" in " ".join(result.stdout.split())


def test_same_inputs_give_byte_identical_outputs(inputs, tmp_path):
    """Two runs (tensors written by several threads, in any order) produce the same bytes.

    That includes the model card (the command line with OUT's path written as
    ``OUT``, the inputs' sha256) and the shards' metadata.
    """
    base, adapter = inputs
    for name in ("first", "second"):
        result = run_cli(
            base, adapter, tmp_path / name, "--max-shard-size", "30KB", "--dtype", "fp16", "-q"
        )
        assert result.returncode == 0, result.stderr
    assert digests(tmp_path / "first") == digests(tmp_path / "second")
    assert "README.md" in digests(tmp_path / "first")
    assert len(digests(tmp_path / "first")) > 3


def test_torch_threads_are_restored_after_a_merge(inputs, tmp_path):
    """The stream runs torch single-threaded inside its own threads; the caller's setting comes back."""
    base, adapter = inputs
    before = torch.get_num_threads()
    merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "merged", quiet=True))
    assert torch.get_num_threads() == before
