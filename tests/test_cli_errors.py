"""Every user mistake gives one line on stderr, its documented exit code, no OUT, and untouched inputs.

The CLI runs as a user runs it: the installed ``lora-merge`` script in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from merge_process import LORA_MERGE

EXIT_USAGE = 2
EXIT_INPUT_NOT_FOUND = 3
EXIT_INVALID_INPUT = 4
EXIT_ADAPTER_MISMATCH = 5
EXIT_OUTPUT_REFUSED = 6


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the installed command; no terminal, so no progress bar."""
    env = {k: v for k, v in os.environ.items() if k != "LORA_MERGE_DEBUG"}
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (symlinks followed)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A valid base (2 shards + index) and a valid adapter."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def _remove(path: Path) -> None:
    path.unlink()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _edit_config(adapter: Path, **changes: object) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def _replace_adapter_tensors(adapter: Path, change: Callable[[dict], None]) -> None:
    tensors = adapter_tensors()
    change(tensors)
    (adapter / "adapter_model.safetensors").unlink()
    write_adapter(adapter, tensors)


def _wrong_input_width(tensors: dict) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(4, 96)


def _untargetable_module(tensors: dict) -> None:
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.randn(4, 64)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.randn(32, 4)


def _dora_magnitude_of_wrong_length(tensors: dict) -> None:
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(
        48
    )


def _index_points_outside(base: Path) -> None:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first_key = next(iter(index["weight_map"]))
    index["weight_map"][first_key] = "../escape.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate_first_shard(base: Path) -> None:
    shard = base / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def _only_pickled_weights(base: Path) -> None:
    for path in base.glob("model*"):
        path.unlink()
    torch.save({"x": torch.zeros(1)}, base / "pytorch_model.bin")


def _write_raw_header(
    path: Path, header: bytes, length: int | None = None, data: bytes = b""
) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def _corrupt_header(base: Path, kind: str) -> None:
    shard = base / "model-00002-of-00002.safetensors"
    keys = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(k for k, f in keys.items() if f == shard.name)
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if kind == "length":
        _write_raw_header(shard, b"{}", length=2**40)
    elif kind == "json":
        _write_raw_header(shard, b'{"a": [1, 2', data=b"\0" * 8)
    elif kind == "overlap":
        other = {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}
        _write_raw_header(shard, json.dumps({name: entry, "x": other}).encode(), data=b"\0" * 12)
    elif kind == "past-end":
        _write_raw_header(shard, json.dumps({name: entry}).encode(), data=b"\0" * 4)
    elif kind == "dtype":
        _write_raw_header(
            shard, json.dumps({name: {**entry, "dtype": "Q4_K"}}).encode(), data=b"\0" * 8
        )


def _vocabulary_resized_before_training(tensors: dict) -> None:
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, 160)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(64, 4)


# (id, how to break the inputs, expected exit code, words the message must contain)
BROKEN_INPUTS = [
    (
        "base-missing",
        lambda b, a: os.rename(b, b.with_name("gone")),
        EXIT_INPUT_NOT_FOUND,
        ["BASE", "does not exist"],
    ),
    (
        "adapter-missing",
        lambda b, a: os.rename(a, a.with_name("gone")),
        EXIT_INPUT_NOT_FOUND,
        ["ADAPTER", "does not exist"],
    ),
    (
        "base-without-weights",
        lambda b, a: [p.unlink() for p in b.glob("model*")],
        EXIT_INPUT_NOT_FOUND,
        ["model.safetensors"],
    ),
    (
        "base-only-pickled",
        lambda b, a: _only_pickled_weights(b),
        EXIT_INVALID_INPUT,
        ["pytorch_model.bin", "safetensors"],
    ),
    (
        "adapter-config-missing",
        lambda b, a: _remove(a / "adapter_config.json"),
        EXIT_INPUT_NOT_FOUND,
        ["adapter_config.json"],
    ),
    (
        "adapter-weights-missing",
        lambda b, a: _remove(a / "adapter_model.safetensors"),
        EXIT_INPUT_NOT_FOUND,
        ["adapter_model.safetensors"],
    ),
    (
        "adapter-config-not-json",
        lambda b, a: _write(a / "adapter_config.json", "{r: 8"),
        EXIT_INVALID_INPUT,
        ["not valid JSON"],
    ),
    (
        "adapter-is-boft",
        lambda b, a: _edit_config(a, peft_type="BOFT"),
        EXIT_INVALID_INPUT,
        ["BOFT", "not support"],
    ),
    (
        "adapter-config-says-ia3-of-a-lora-file",
        lambda b, a: _edit_config(a, peft_type="IA3"),
        EXIT_INVALID_INPUT,
        ["LoRA tensors", "IA3", "do not belong together"],
    ),
    (
        "adapter-config-without-peft-type",
        lambda b, a: _edit_config(a, peft_type=None),
        EXIT_INVALID_INPUT,
        ["no 'peft_type'"],
    ),
    (
        "adapter-config-not-an-object",
        lambda b, a: _write(a / "adapter_config.json", "[1, 2]"),
        EXIT_INVALID_INPUT,
        ["not a JSON object"],
    ),
    (
        "adapter-weights-corrupt",
        lambda b, a: _write(a / "adapter_model.safetensors", "garbage"),
        EXIT_INVALID_INPUT,
        ["adapter_model.safetensors", "not a valid safetensors"],
    ),
    (
        "vocabulary-mismatch",
        lambda b, a: _replace_adapter_tensors(a, _vocabulary_resized_before_training),
        EXIT_ADAPTER_MISMATCH,
        ["160 tokens", "128 rows", "resiz"],
    ),
    (
        "header-length-absurd",
        lambda b, a: _corrupt_header(b, "length"),
        EXIT_INVALID_INPUT,
        ["implausibly large"],
    ),
    (
        "header-bad-json",
        lambda b, a: _corrupt_header(b, "json"),
        EXIT_INVALID_INPUT,
        ["not valid JSON"],
    ),
    (
        "header-overlapping-offsets",
        lambda b, a: _corrupt_header(b, "overlap"),
        EXIT_INVALID_INPUT,
        ["overlap"],
    ),
    (
        "header-offsets-past-end",
        lambda b, a: _corrupt_header(b, "past-end"),
        EXIT_INVALID_INPUT,
        ["past the end"],
    ),
    (
        "header-unknown-dtype",
        lambda b, a: _corrupt_header(b, "dtype"),
        EXIT_INVALID_INPUT,
        ["unknown dtype", "Q4_K"],
    ),
    (
        "adapter-is-prompt-tuning",
        lambda b, a: _edit_config(a, peft_type="PROMPT_TUNING"),
        EXIT_INVALID_INPUT,
        ["prompt tuning"],
    ),
    ("rank-zero", lambda b, a: _edit_config(a, r=0), EXIT_INVALID_INPUT, ["'r'", "positive"]),
    (
        "alpha-absent",
        lambda b, a: _edit_config(a, lora_alpha=None),
        EXIT_INVALID_INPUT,
        ["lora_alpha"],
    ),
    (
        "dora-magnitude-does-not-fit",
        lambda b, a: _replace_adapter_tensors(a, _dora_magnitude_of_wrong_length),
        EXIT_ADAPTER_MISMATCH,
        ["lora_magnitude_vector", "(48,)", "64 output features", "DoRA"],
    ),
    (
        "shape-mismatch",
        lambda b, a: _replace_adapter_tensors(a, _wrong_input_width),
        EXIT_ADAPTER_MISMATCH,
        ["q_proj.lora_A.weight", "(4, 96)", "(64, 64)", "different base model"],
    ),
    (
        "unmatched-key",
        lambda b, a: _replace_adapter_tensors(a, _untargetable_module),
        EXIT_ADAPTER_MISMATCH,
        ["k_proj", "not a tensor of the base"],
    ),
    (
        "shard-missing",
        lambda b, a: _remove(b / "model-00002-of-00002.safetensors"),
        EXIT_INPUT_NOT_FOUND,
        ["model-00002-of-00002.safetensors", "missing"],
    ),
    (
        "index-path-escapes",
        lambda b, a: _index_points_outside(b),
        EXIT_INVALID_INPUT,
        ["../escape.safetensors", "refusing"],
    ),
    (
        "shard-truncated",
        lambda b, a: _truncate_first_shard(b),
        EXIT_INVALID_INPUT,
        ["model-00001-of-00002.safetensors", "truncated"],
    ),
]


@pytest.mark.parametrize(
    ("break_inputs", "exit_code", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BROKEN_INPUTS],
)
def test_bad_input_is_one_line_with_its_exit_code_and_no_output(
    inputs: tuple[Path, Path], tmp_path: Path, break_inputs, exit_code: int, words: list[str]
) -> None:
    """Each broken input is refused before OUT exists, with a message that names the problem."""
    base, adapter = inputs
    break_inputs(base, adapter)
    before = {p: folder_digest(p) for p in (base, adapter) if p.exists()}
    result = run_cli(base, adapter, tmp_path / "merged")

    assert result.returncode == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lora-merge: error: ")
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged.lora-merge-partial-*"))
    assert {p: folder_digest(p) for p in before} == before


@pytest.mark.parametrize("spelling", ["./{org}/typo", "{org}/./typo"])
def test_mistyped_relative_path_is_not_sent_to_the_hub(
    inputs: tuple[Path, Path], tmp_path: Path, spelling: str
) -> None:
    """``./org/typo`` names a folder, never the repo ``org/typo``: it is refused at once as a
    path that does not exist, with no Hub request (offline the Hub path would say the repo
    is not cached instead)."""
    base, adapter = inputs
    missing = spelling.format(org=base.parent.name)
    result = subprocess.run(
        [LORA_MERGE, missing, str(adapter), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        cwd=base.parent.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )

    assert result.returncode == EXIT_INPUT_NOT_FOUND, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"lora-merge: error: BASE {missing} does not exist: it is neither a folder nor a "
        "Hugging Face Hub repo id (org/name or org/name@revision); check the path"
    ]
    assert not (tmp_path / "merged").exists()


def test_out_that_exists_is_refused_unless_overwrite(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A non-empty OUT survives a run without --overwrite, and is replaced with it."""
    base, adapter = inputs
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    refused = run_cli(base, adapter, out)
    assert refused.returncode == EXIT_OUTPUT_REFUSED
    assert "--overwrite" in refused.stderr
    assert (out / "keep.txt").read_text() == "mine"

    replaced = run_cli(base, adapter, out, "--overwrite", "--quiet")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".merged.lora-merge-partial-*"))


def test_empty_out_folder_is_used(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """An existing empty OUT (e.g. made by a script) is not an error."""
    base, adapter = inputs
    (tmp_path / "merged").mkdir()
    result = run_cli(base, adapter, tmp_path / "merged", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_out_inside_an_input_is_refused_through_symlinks_and_dots(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """OUT may not lie in BASE or ADAPTER, however it is spelled; nor contain them."""
    base, adapter = inputs
    (tmp_path / "link-to-adapter").symlink_to(adapter)
    spellings = [
        base / "merged",
        tmp_path / "link-to-adapter" / "merged",
        tmp_path / "elsewhere" / ".." / "adapter" / "sub" / "merged",
    ]
    before = {p: folder_digest(p) for p in (base, adapter)}
    for out in spellings:
        result = run_cli(base, adapter, out)
        assert result.returncode == EXIT_OUTPUT_REFUSED, (out, result.stderr)
        assert "inside the input folder" in result.stderr
    contains = run_cli(base, adapter, tmp_path, "--overwrite")
    assert contains.returncode == EXIT_OUTPUT_REFUSED
    assert "contains the input folder" in contains.stderr
    assert {p: folder_digest(p) for p in before} == before


@pytest.mark.parametrize(
    ("option", "value"),
    [("--dtype", "int8"), ("--max-shard-size", "5XB"), ("--max-memory", "-1"), ("--device", "tpu")],
)
def test_bad_option_values_are_usage_errors(
    inputs: tuple[Path, Path], tmp_path: Path, option: str, value: str
) -> None:
    """Values the CLI cannot parse exit 2 (usage) before touching anything, in one line."""
    base, adapter = inputs
    result = run_cli(base, adapter, tmp_path / "merged", option, value)
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error: "), result.stderr
    assert option in lines[0]
    assert not (tmp_path / "merged").exists()


class _RunsCode:
    """Unpickling this calls os.system: what a hostile adapter_model.bin would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_adapter_is_refused_without_running_it(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """adapter_model.bin is loaded with weights_only=True: its code never runs."""
    base, adapter = inputs
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(
        {"payload": _RunsCode(marker)},
        adapter / "adapter_model.bin",
        pickle_protocol=pickle.DEFAULT_PROTOCOL,
    )

    result = run_cli(base, adapter, tmp_path / "merged")
    assert result.returncode == EXIT_INVALID_INPUT, result.stderr
    assert "never runs code from pickles" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "merged").exists()


def test_help_documents_every_option_and_the_exit_codes() -> None:
    """--help explains the command, names every option and lists the exit codes."""
    result = run_cli("--help")
    assert result.returncode == 0
    for option in (
        "--dtype",
        "--max-shard-size",
        "--max-memory",
        "--device",
        "--overwrite",
        "--quiet",
        "--version",
    ):
        assert option in result.stdout
    assert "Exit codes" in result.stdout


def test_version_comes_from_the_package_metadata() -> None:
    """--version prints the installed distribution's version."""
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"lora-merge {version('lora-merge')}"
