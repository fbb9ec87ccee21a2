"""What a new user hit (issue 14): each case runs the installed ``lora-merge`` as a user does.

- Choice options are case-insensitive, and every option is checked (and a bad one
  refused with exit 2) before any input is read and before OUT or a staging folder exists;
  the Python API normalises and refuses exactly the same values.
- ``--dry-run``'s memory line bounds the memory the merge then uses.
- A DoRA adapter is refused in a combination when only its config says so.
- ``--private``/``--revision`` without ``--push-to-hub`` are refused by the API too.
- The CLI's warning printer does not outlive the command.
- Option conflicts are usage errors (exit 2), never invalid input (exit 4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from merge_process import LORA_MERGE
from safetensors.torch import save_file

from lora_merge import MergeOptions, merge
from lora_merge.compute.bitsandbytes_backend import load_bitsandbytes
from lora_merge.errors import EXIT_INVALID_INPUT, EXIT_USAGE, LoraMergeError, UsageError


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, no terminal (so no progress bar), no debug tracebacks."""
    environment = {k: v for k, v in (env or os.environ).items() if k != "LORA_MERGE_DEBUG"}
    return subprocess.run(
        [LORA_MERGE, *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def model_files(folder: Path) -> dict[str, bytes]:
    """The files of a merged model that depend on the merge (the card records the command line)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if "lora-merge-partial" in p.name]


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


@pytest.fixture
def two_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base and two adapters of the same rank (so every --combine method applies)."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "first", adapter_tensors(seed=1))
    write_adapter(tmp_path / "second", adapter_tensors(seed=2))
    return tmp_path / "base", tmp_path / "first", tmp_path / "second"


# 1. Choices are case-insensitive; every option is checked before any work.


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
    inputs: tuple[Path, Path],
    tmp_path: Path,
    shouted: list[str],
    spoken: list[str],
    needs_bitsandbytes: bool,
) -> None:
    """``--quant-type NF4`` is ``--quant-type nf4``: the same files (the claim is only that
    the spelling changes nothing, so the lower-case run is the reference)."""
    if needs_bitsandbytes:
        _bitsandbytes_or_skip()
    base, adapter = inputs
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
    two_adapters: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, first, second = two_adapters
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
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """The API takes what the CLI takes: ``quant_type="NF4"`` is nf4, not a ValueError mid-merge."""
    _bitsandbytes_or_skip()
    base, adapter = inputs
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


# 2. --dry-run's memory line.

# The embedding LoRA of the memory test: A is (RANK, VOCAB) float32, 32 MiB, far
# more than the q_proj LoRA beside it, whose rank (16) is the larger one.
VOCAB, HIDDEN, RANK = 2**20, 32, 8

# Runs the command in argv and prints its peak resident set in bytes, its exit code,
# then its stdout. A small Python in between, because a child's ru_maxrss also
# counts what the process that exec'd it held (a fork of pytest, torch and all).
_PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(peak if sys.platform == "darwin" else peak * 1024)  # macOS counts bytes, Linux KiB
print(done.returncode)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
"""


def _write_embedding_case(root: Path) -> tuple[Path, Path, Path]:
    """A bf16 base; an adapter with a rank-16 q_proj LoRA and a rank-8 embedding LoRA;
    and the same adapter without the embedding LoRA."""
    base, adapter, control = root / "base", root / "adapter", root / "control"
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    base.mkdir()
    save_file(
        {
            "model.embed_tokens.weight": random(VOCAB, HIDDEN).bfloat16(),
            "model.layers.0.self_attn.q_proj.weight": random(HIDDEN, HIDDEN).bfloat16(),
            "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        },
        base / "model.safetensors",
        metadata={"format": "pt"},
    )
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN})
    )
    prefix = "base_model.model.model."
    q_proj = {
        f"{prefix}layers.0.self_attn.q_proj.lora_A.weight": random(16, HIDDEN) * 0.1,
        f"{prefix}layers.0.self_attn.q_proj.lora_B.weight": random(HIDDEN, 16) * 0.1,
    }
    embedding = {
        f"{prefix}embed_tokens.lora_embedding_A": random(RANK, VOCAB) * 0.1,
        f"{prefix}embed_tokens.lora_embedding_B": random(HIDDEN, RANK) * 0.1,
    }
    # alpha = 2r: the scale 2 is folded into A, one more copy of it.
    config = {"r": RANK, "lora_alpha": 2 * RANK, "rank_pattern": {"q_proj": 16}}
    write_adapter(adapter, {**q_proj, **embedding}, **config, alpha_pattern={"q_proj": 32})
    write_adapter(control, q_proj, **config, alpha_pattern={"q_proj": 32})
    return base, adapter, control


def _peak_rss(*args: object) -> tuple[int, str]:
    """The peak resident bytes of one ``lora-merge`` run, and its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, LORA_MERGE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    peak, returncode, stdout = result.stdout.split("\n", 2)
    assert int(returncode) == 0, result.stderr
    return int(peak), stdout


def _estimate_and_growth(base: Path, adapter: Path, out: Path) -> tuple[int, int]:
    """--dry-run's estimate, and how much more memory the merge then holds than the dry run.

    The dry run does all the merge does before streaming (imports, headers, plan),
    so the difference is what streaming adds. Every tensor is converted to fp16, so
    every thread fills its tile buffers with or without the embedding LoRA; hashing
    is off, as its thread's buffers are not tensor data.
    """
    options = ("--no-hash-inputs", "--dtype", "fp16")
    dry_peak, report = _peak_rss(base, adapter, out, "--dry-run", "--json", *options)
    estimate = json.loads(report)["working_memory_bytes"]
    merge_peak, _ = _peak_rss(base, adapter, out, "-q", *options)
    shutil.rmtree(out)
    return estimate, merge_peak - dry_peak


@pytest.mark.skipif(
    sys.platform == "win32", reason="a finished child's peak RSS comes from getrusage (POSIX)"
)
def test_dry_run_memory_bounds_what_a_large_embedding_lora_makes_the_merge_hold(
    tmp_path: Path,
) -> None:
    """The estimate bounds the memory streaming adds, and is not loose.

    Streaming also costs memory that is no tensor data: code mapped on first use
    (torch's kernels, the BLAS and its buffers), thread stacks, allocator slack. The
    same merge without the embedding LoRA measures those on this machine, and its
    own tensor data is covered by the estimate as well, so ``growth <= estimate +
    control growth`` holds wherever those costs are the same in both runs. The other
    way, the embedding's A is read (32 MiB) and scaled (32 MiB) in full, every page
    touched, so the memory it adds is at least half the estimate's share for it.
    """
    base, adapter, control = _write_embedding_case(tmp_path)
    estimate, growth = _estimate_and_growth(base, adapter, tmp_path / "out")
    control_estimate, control_growth = _estimate_and_growth(base, control, tmp_path / "out")
    embedding_a_bytes = RANK * VOCAB * 4
    assert estimate >= 2 * embedding_a_bytes  # A read, and A scaled
    assert growth <= estimate + control_growth, (estimate, growth, control_growth)
    assert estimate - control_estimate <= 2 * (growth - control_growth), (estimate, growth)


# 3. A DoRA adapter in a combination.


def test_dora_adapter_by_its_config_is_refused_in_a_combination(
    two_adapters: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """use_dora in adapter_config.json is enough: DoRA cannot be combined (exit 4, nothing written)."""
    base, first, second = two_adapters
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    out = tmp_path / "out"
    result = run_cli(base, first, second, out, "-q")
    assert result.returncode == EXIT_INVALID_INPUT, result.stderr
    assert_one_error_line(result, str(second), "DoRA", "use_dora", "cannot be combined")
    assert_nothing_written(tmp_path, out)


# 4. --private and --revision without --push-to-hub.


@pytest.mark.parametrize(
    ("cli_option", "api_option"),
    [(["--private"], {"private": True}), (["--revision", "dev"], {"hub_revision": "dev"})],
)
def test_push_options_without_a_push_are_refused_by_cli_and_api_alike(
    inputs: tuple[Path, Path], tmp_path: Path, cli_option: list[str], api_option: dict
) -> None:
    base, adapter = inputs
    result = run_cli(base, adapter, tmp_path / "out", *cli_option)
    assert result.returncode == EXIT_USAGE
    cli_message = assert_one_error_line(result, "--push-to-hub")
    with pytest.raises(UsageError) as refusal:
        merge(MergeOptions(base=base, adapter=adapter, out=tmp_path / "out", **api_option))
    assert cli_message == f"lora-merge: error: {refusal.value}"
    assert_nothing_written(tmp_path, tmp_path / "out")


# 5. The CLI's warning printer.


@pytest.mark.parametrize("succeeds", [True, False], ids=["merged", "refused"])
def test_cli_main_gives_warnings_showwarning_back(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    succeeds: bool,
) -> None:
    """A program that calls the CLI's main() keeps its own warning printer afterwards, and
    the run's own warning (a base-name mismatch) was printed as lora-merge's one line."""
    from lora_merge import cli

    base, adapter = inputs
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


# 6. Conflicts between options are usage errors.


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
    inputs: tuple[Path, Path], tmp_path: Path, options: list[str]
) -> None:
    base, adapter = inputs
    result = run_cli(base, adapter, tmp_path / "out", *options)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "options", [["--unmerge"], ["--rank", "4", "--alpha", "8"]], ids=["unmerge", "loralib"]
)
def test_one_adapter_options_with_several_adapters_are_usage_errors(
    two_adapters: tuple[Path, Path, Path], tmp_path: Path, options: list[str]
) -> None:
    base, first, second = two_adapters
    result = run_cli(base, first, second, tmp_path / "out", *options)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_one_error_line(result, "one adapter")
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("largest", [1.5, 3e38], ids=["folds", "would-overflow"])
def test_scale_folded_into_a_only_where_that_cannot_overflow(largest: float) -> None:
    """The memory the estimate counts for folding: A * scale is made only when no entry
    overflows (3e38 * 2 would, in float32); either way the delta is PEFT's (B @ A) * scale.

    Rank 1, so each entry of B @ A is one product, exact in float64: the float64
    reference rounded once to float32 is the exact answer, and scaling by 2 is exact.
    """
    from lora_merge.compute.lora import lora_delta_rows, prepare_lora_factors

    lora_a = torch.tensor([[largest, -1.0, 0.25]])
    lora_b = torch.tensor([[1e-3], [-0.5]])
    factors = prepare_lora_factors(lora_a, lora_b, 2.0, False, torch.float32)
    delta = lora_delta_rows(factors, 0, 2)
    exact = (lora_b.double() @ lora_a.double()) * 2.0
    assert bool(torch.isfinite(exact.float()).all())
    assert torch.equal(delta, exact.float()), (delta, exact)
    assert factors.scale == (2.0 if largest > 1e38 else 1.0)
