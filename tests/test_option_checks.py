"""Options as the user types them (issue 14): every option is checked before any work.

- Choice options are case-insensitive: ``--quant-type NF4`` is ``--quant-type nf4``.
- A bad value or a conflict is refused with exit 2, naming the option, before any input is
  read and before OUT or a staging folder exists; the Python API refuses exactly the same
  values as UsageError.
- ``--private``/``--revision`` without ``--push-to-hub``, loralib and one-adapter options
  with several adapters: usage errors (exit 2), never invalid input (exit 4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from cli_runs import assert_nothing_written, assert_one_error_line, model_files, run_cli

from lora_merge import MergeOptions, merge
from lora_merge.compute.bitsandbytes_backend import load_bitsandbytes
from lora_merge.errors import EXIT_INVALID_INPUT, EXIT_USAGE, LoraMergeError, UsageError

# Choices are case-insensitive; every option is checked before any work.


def _bitsandbytes_or_skip() -> None:
    if load_bitsandbytes() is None:
        pytest.skip(
            "--save-method merged_4bit re-quantizes with bitsandbytes, which does not load here"
        )


@pytest.mark.parametrize(
    ("shouted", "spoken", "needs_bitsandbytes"),
    [
        (
            ["--save-method", "MERGED_4BIT", "--quant-type", "NF4"],
            ["--save-method", "merged_4bit", "--quant-type", "nf4"],
            True,
        ),
        (
            ["--quant-type", "FP4", "--save-method", "Merged_4bit"],
            ["--quant-type", "fp4", "--save-method", "merged_4bit"],
            True,
        ),
        (["--dtype", "BF16", "--device", "CPU"], ["--dtype", "bf16", "--device", "cpu"], False),
        (["--dtype", "Float32"], ["--dtype", "fp32"], False),
    ],
    ids=["merged_4bit-NF4", "merged_4bit-FP4", "dtype-device", "dtype-long-name"],
)
def test_choices_in_any_case_mean_the_same(
    handmade_inputs: tuple[Path, Path],
    tmp_path: Path,
    shouted: list[str],
    spoken: list[str],
    needs_bitsandbytes: bool,
) -> None:
    """``--quant-type NF4`` is ``--quant-type nf4``: the same files (the claim is only that
    the spelling changes nothing, so the lower-case run is the reference)."""
    if needs_bitsandbytes:
        _bitsandbytes_or_skip()
    base, adapter = handmade_inputs
    upper = run_cli(base, adapter, tmp_path / "upper", "-q", *shouted)
    assert upper.returncode == 0, upper.stderr
    lower = run_cli(base, adapter, tmp_path / "lower", "-q", *spoken)
    assert lower.returncode == 0, lower.stderr
    assert model_files(tmp_path / "upper") == model_files(tmp_path / "lower")
    if "merged_4bit" in spoken:
        config = json.loads((tmp_path / "upper" / "config.json").read_text())
        quant_type = spoken[spoken.index("--quant-type") + 1]
        assert config["quantization_config"]["bnb_4bit_quant_type"] == quant_type


def test_combine_choices_in_any_case_mean_the_same(
    two_handmade_adapters: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, first, second = two_handmade_adapters
    common = ["--density", "0.5", "-q"]
    upper = run_cli(
        base, first, second, tmp_path / "upper", "--combine", "TIES",
        "--majority-sign-method", "Frequency", *common,
    )  # fmt: skip
    assert upper.returncode == 0, upper.stderr
    lower = run_cli(
        base, first, second, tmp_path / "lower", "--combine", "ties",
        "--majority-sign-method", "frequency", *common,
    )  # fmt: skip
    assert lower.returncode == 0, lower.stderr
    assert model_files(tmp_path / "upper") == model_files(tmp_path / "lower")


# Every bad value or conflict, as the user types it: exit 2, nothing read, nothing written.
BAD_OPTIONS = [
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--save-method", "merged_8bit"], "--save-method"),
    (["--quant-type", "int4"], "--quant-type"),
    (["--max-memory", "0"], "--max-memory"),
    (["--combine", "average"], "--combine"),
    (
        ["--combine", "ties", "--density", "0.5", "--majority-sign-method", "most"],
        "--majority-sign-method",
    ),
    (["--combine", "ties"], "--density"),
    (["--weights", "0.5,x"], "--weights"),
    (["--svd-rank", "4"], "--svd-rank"),
    (["--private"], "--push-to-hub"),
    (["--revision", "dev"], "--push-to-hub"),
    (["--rank", "4"], "--alpha"),
    (["--alpha", "8"], "--rank"),
    (["--enable-lora", "1,0,1"], "--rank"),
    (["--rank", "4", "--alpha", "8", "--enable-lora", "1,x"], "--enable-lora"),
    (["--unmerge", "--save-method", "lora"], "--unmerge"),
    (["--double-quant"], "--double-quant"),
    (["--verify", "--save-method", "lora"], "--verify"),
    (["--dtype", "bf16", "--save-method", "lora"], "--dtype"),
]


@pytest.mark.parametrize(
    ("options", "named"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS]
)
def test_bad_options_are_refused_before_any_input_is_read(
    tmp_path: Path, options: list[str], named: str
) -> None:
    """BASE and ADAPTER do not exist: a refusal about the options (exit 2, naming the option)
    rather than about them (exit 3) shows the options were checked first."""
    out = tmp_path / "out"
    result = run_cli(tmp_path / "no-base", tmp_path / "no-adapter", out, *options)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path, out)


def test_quant_type_in_capitals_merges_from_python(
    handmade_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """The API takes what the CLI takes: ``quant_type="NF4"`` is nf4, not a ValueError mid-merge."""
    _bitsandbytes_or_skip()
    base, adapter = handmade_inputs
    merge(
        MergeOptions(
            base=base, adapter=adapter, out=tmp_path / "out", quiet=True,
            save_method="Merged_4bit", quant_type="NF4", dtype="BF16", device="CPU",
        )
    )  # fmt: skip
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


API_BAD_OPTIONS = [
    {"dtype": "int8"},
    {"device": "tpu"},
    {"save_method": "merged_8bit"},
    {"quant_type": "int4"},
    {"quant_blocksize": 100},
    {"max_shard_size": "5XB"},
    {"max_memory": 0},
    {"combine": "TIES", "density": 0.5, "majority_sign_method": "most"},
    {"private": True},
    {"hub_revision": "dev"},
    {"push_to_hub": "not a repo id"},
    {"rank": 4},
    {"rank": 0, "alpha": 8},
    {"enable_lora": "1,0,1"},
    {"unmerge": True, "combine": "cat"},
    {"rank": 4, "alpha": 8, "combine": "cat"},
    {"double_quant": True},
    {"verify": True, "save_method": "lora"},
    {"dtype": "fp16", "save_method": "lora"},
    {"allow_nonfinite": True, "save_method": "lora"},
    {"adapter": []},
    {"dtype": torch.bfloat16},
    {"combine": "ties_svd", "density": 0.5, "svd_rank": "4"},
    {"combine": "dare_ties", "density": "0.5"},
    {"combine": "dare_ties", "density": 0.5, "seed": 1.5},
]


@pytest.mark.parametrize("changes", API_BAD_OPTIONS, ids=[str(c) for c in API_BAD_OPTIONS])
def test_api_refuses_what_the_cli_refuses_as_usage_errors(tmp_path: Path, changes: dict) -> None:
    """From Python the same mistakes are UsageError (exit code 2), raised before BASE (missing
    here) is looked at."""
    out = tmp_path / "out"
    options = {"base": tmp_path / "no-base", "adapter": tmp_path / "no-adapter", "out": out}
    with pytest.raises(LoraMergeError) as refusal:
        merge(MergeOptions(**{**options, **changes}))
    assert isinstance(refusal.value, UsageError), refusal.value
    assert refusal.value.exit_code == EXIT_USAGE
    assert_nothing_written(tmp_path, out)


def test_merged_4bit_without_bitsandbytes_is_refused_before_any_input_is_read(
    tmp_path: Path,
) -> None:
    """Where bitsandbytes does not load, merged_4bit is refused up front (exit 4), not at the
    first weight to re-quantize; BASE and ADAPTER do not even exist here."""
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no native library for this CPU')\n")
    environment = {**os.environ, "PYTHONPATH": str(broken.parent)}
    out = tmp_path / "out"
    result = run_cli(
        tmp_path / "no-base", tmp_path / "no-adapter", out, "--save-method", "merged_4bit",
        env=environment,
    )  # fmt: skip
    assert result.returncode == EXIT_INVALID_INPUT, result.stderr
    assert_one_error_line(result, "bitsandbytes", "merged_16bit")
    assert_nothing_written(tmp_path, out)


# --private and --revision without --push-to-hub.


@pytest.mark.parametrize(
    ("cli_option", "api_option"),
    [(["--private"], {"private": True}), (["--revision", "dev"], {"hub_revision": "dev"})],
)
def test_push_options_without_a_push_are_refused_by_cli_and_api_alike(
    handmade_inputs: tuple[Path, Path], tmp_path: Path, cli_option: list[str], api_option: dict
) -> None:
    base, adapter = handmade_inputs
    result = run_cli(base, adapter, tmp_path / "out", *cli_option)
    assert result.returncode == EXIT_USAGE
    cli_message = assert_one_error_line(result, "--push-to-hub")
    with pytest.raises(UsageError) as refusal:
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", **api_option))
    assert cli_message == f"lora-merge: error: {refusal.value}"
    assert_nothing_written(tmp_path, tmp_path / "out")


# Conflicts between options are usage errors.


@pytest.mark.parametrize(
    "options",
    [
        ["--rank", "4"],
        ["--enable-lora", "1,0,1"],
        ["--rank", "0", "--alpha", "8"],
        ["--rank", "4", "--alpha", "nan"],
    ],
    ids=["rank-without-alpha", "enable-lora-without-rank", "rank-zero", "alpha-nan"],
)
def test_loralib_option_conflicts_are_usage_errors(
    handmade_inputs: tuple[Path, Path], tmp_path: Path, options: list[str]
) -> None:
    base, adapter = handmade_inputs
    result = run_cli(base, adapter, tmp_path / "out", *options)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "options", [["--unmerge"], ["--rank", "4", "--alpha", "8"]], ids=["unmerge", "loralib"]
)
def test_one_adapter_options_with_several_adapters_are_usage_errors(
    two_handmade_adapters: tuple[Path, Path, Path], tmp_path: Path, options: list[str]
) -> None:
    base, first, second = two_handmade_adapters
    result = run_cli(base, first, second, tmp_path / "out", *options)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_one_error_line(result, "one adapter")
    assert_nothing_written(tmp_path, tmp_path / "out")
