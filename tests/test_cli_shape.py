"""The command's shape (issue 15): ``--help`` and the README print the one exit-code table
of ``errors.py``; choices show as ``[a|b]`` and flags bare; every option value the user
types reaches the library's one check, so a bad one is one line, worded as the Python
API words it, and exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from merge_process import LORA_MERGE

from lora_merge import MergeOptions, merge
from lora_merge.cli import app
from lora_merge.errors import EXIT_CODES, EXIT_USAGE, UsageError
from lora_merge.options import OutputDtype, QuantType, SaveMethod

README = Path(__file__).resolve().parents[1] / "README.md"
# Wide enough that rich never wraps a cell of --help (it reads this variable through Typer).
WIDE = {**os.environ, "TERMINAL_WIDTH": "400"}


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in WIDE.items() if k != "LORA_MERGE_DEBUG"}
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, env=environment, timeout=300
    )


def readme_exit_codes() -> list[tuple[int, str]]:
    """The rows of the README's "Exit codes" table, code formatting (backticks) set aside."""
    section = README.read_text(encoding="utf-8").split("\n### Exit codes\n", 1)[1]
    table = section.strip().split("\n\n", 1)[0].splitlines()
    assert table[0].replace(" ", "") == "|code|meaning|", table[0]
    rows = []
    for line in table[2:]:
        code, meaning = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((int(code), meaning.replace("`", "")))
    return rows


def test_readme_exit_code_table_is_the_one_in_errors() -> None:
    assert readme_exit_codes() == list(EXIT_CODES)


@pytest.fixture(scope="module")
def help_text() -> str:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_ends_with_every_exit_code_and_its_meaning(help_text: str) -> None:
    epilog = " ".join(help_text.split("Exit codes:", 1)[1].split())
    for code, meaning in EXIT_CODES:
        assert f"{code} {' '.join(meaning.split())}" in epilog


def test_help_shows_choices_bare_flags_and_panels(help_text: str) -> None:
    for choices in (
        "[auto|bf16|fp16|fp32]",
        "[merged_16bit|merged_4bit|merged_native|lora]",
        "[nf4|fp4]",
        "[total|frequency]",
        "[auto|cpu|cuda|cuda:N]",
    ):
        assert choices in help_text
    assert "<bool>" not in help_text  # flags (--verify, --help...) show no value to type
    for panel in ("Output", "Several adapters", "Quantized bases", "Hub", "Safety and recovery"):
        assert re.search(rf"╭─ {panel} ─", help_text), panel


def test_every_command_option_is_a_merge_option() -> None:
    """The command hands its parameters to MergeOptions by name: each one must be a field
    (else it would be dropped), and each field but the Python-only ones a parameter."""
    command = typer.main.get_command(app)
    parameters = {param.name for param in command.params} - {"dry_run", "json_summary", "version"}
    python_only = {"quant_blocksize", "command"}
    assert parameters == {f.name for f in fields(MergeOptions)} - python_only


BAD_VALUES = [
    ("--dtype", "int8", {"dtype": "int8"}),
    ("--device", "tpu", {"device": "tpu"}),
    ("--save-method", "Merged_8bit", {"save_method": "Merged_8bit"}),
    ("--quant-type", "INT4", {"quant_type": "INT4"}),
    ("--max-memory", "0", {"max_memory": "0"}),
    ("--max-shard-size", "5XB", {"max_shard_size": "5XB"}),
    ("--rank", "0", {"rank": 0, "alpha": 8.0}),
]


@pytest.mark.parametrize(
    ("option", "value", "api_options"), BAD_VALUES, ids=[o for o, _, _ in BAD_VALUES]
)
def test_bad_value_is_the_api_refusal_in_one_line(
    tmp_path: Path, option: str, value: str, api_options: dict
) -> None:
    """The CLI does not parse values itself: its one line is the API's UsageError, word for
    word (Click's own parsing would print a boxed error instead), and names the option."""
    paths = {
        "base": tmp_path / "no-base",
        "adapter": tmp_path / "no-adapter",
        "out": tmp_path / "o",
    }
    extra = ["--alpha", "8"] if option == "--rank" else []
    result = run_cli(paths["base"], paths["adapter"], paths["out"], option, value, *extra)
    with pytest.raises(UsageError) as refusal:
        merge(MergeOptions(**paths, **api_options))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [f"lora-merge: error: {refusal.value}"]
    assert option in result.stderr
    assert not paths["out"].exists()


def test_choices_print_and_serialise_as_their_values() -> None:
    """Settings hand enum members to code that writes text (config.json, the model card):
    a member must read as its value there, whatever the Python version's Enum formatting."""
    assert f"{QuantType.NF4}" == str(QuantType.NF4) == "nf4"
    assert json.dumps({"bnb_4bit_quant_type": QuantType.FP4}) == '{"bnb_4bit_quant_type": "fp4"}'
    assert SaveMethod.parse(" Merged_4BIT ", "--save-method") == "merged_4bit"
    assert OutputDtype.parse("Float32", "--dtype", {"float32": "fp32"}) is OutputDtype.FP32
