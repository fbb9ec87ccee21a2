"""OUT as a user receives it: a resized vocabulary with the adapter's tokenizer, exactly the
files a standalone model needs, and what the command prints on a terminal, in a pipe and as JSON.

Models are built from configs and tokenizers from in-memory vocabularies: nothing is downloaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from merge_oracle import read_safetensors_directory
from merge_process import LORA_MERGE
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from tiny_checkpoints import (
    TINY_VOCAB_SIZE,
    save_tiny_base_checkpoint,
    stable_seed,
    unmerged_tolerance,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lora_merge import MergeOptions, merge

ADAPTER_PREFIX = "base_model.model."

# The user adds 8 special tokens and 8 ordinary words: 256 -> 272 rows.
ADDED_SPECIAL_TOKENS = [f"<extra_{i}>" for i in range(8)]
ADDED_WORDS = [f"newword{i}" for i in range(8)]
RESIZED_VOCAB_SIZE = TINY_VOCAB_SIZE + len(ADDED_SPECIAL_TOKENS) + len(ADDED_WORDS)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
BASE_CHAT_TEMPLATE = "BASE-TEMPLATE {% for m in messages %}{{ m['content'] }}{% endfor %}"
ADAPTER_CHAT_TEMPLATE = "ADAPTER-TEMPLATE {% for m in messages %}[{{ m['content'] }}]{% endfor %}"
# A text whose encoding mixes base words with added tokens (ids >= 256).
PROMPT_TEXT = "w1 <extra_0> w17 newword3 w200 <extra_7> newword7 w5 <extra_2> w99"

# handmade_checkpoints.write_adapter() adapts q_proj and v_proj in both layers.
HANDMADE_LORA_MODULES = 4
SUMMARY_PATTERN = re.compile(
    r"merged (\d+) LoRA modules into (\d+) tensors \((\d+) copied unchanged[^)]*\), "
    r"wrote .+? in (\d+) shard\(s\) to (.+) in [\d.]+ s \([\d.]+ GB/s, \d+ thread\(s\)\)"
)


# ---------------------------------------------------------------------------------------------
# 1. A resized vocabulary: added tokens, modules_to_save embeddings, the adapter's tokenizer.
# ---------------------------------------------------------------------------------------------


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token WordLevel tokenizer built in memory: <unk>, <s>, </s>, w0 ... w252."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(TINY_VOCAB_SIZE - 3)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@torch.no_grad()
def perturb_modules_to_save(peft_model: PeftModel, generator: torch.Generator) -> None:
    """Change the trainable copies of embed_tokens and lm_head, as training would, so that they
    differ from the base's rows (and from PEFT's ``original_module``) everywhere."""
    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            weight = module.modules_to_save["default"].weight
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
            weight.copy_((weight.float() + 0.01 * noise).to(weight.dtype))


def load_base_resized(base: Path, dtype: torch.dtype) -> PreTrainedModel:
    """BASE with its embeddings resized to the new vocabulary, as a user reloads it for PEFT."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    # The new rows are overwritten by the adapter's modules_to_save copies; mean_resizing=False
    # only avoids a random draw and its warning.
    model.resize_token_embeddings(RESIZED_VOCAB_SIZE, mean_resizing=False)
    return model


def load_resized_peft_model(base: Path, adapter: Path, dtype: torch.dtype) -> PeftModel:
    """PeftModel.from_pretrained on the resized base, in eval mode, adapter not merged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PeftModel.from_pretrained(load_base_resized(base, dtype), adapter).eval()


@dataclass(frozen=True)
class ResizedVocabularyMerge:
    """Inputs of the added-tokens flow, the merged OUT, and what the user's model held."""

    base: Path
    adapter: Path
    out: Path
    trained_vocab_tensors: dict[str, torch.Tensor]  # modules_to_save copies right before saving


@pytest.fixture(scope="module")
def resized_vocabulary(tmp_path_factory) -> ResizedVocabularyMerge:
    """Build BASE (sharded bf16 tiny Llama + a tokenizer), fine-tune-with-added-tokens as a user
    would, save the adapter with its own tokenizer, and merge with lora_merge.merge()."""
    root = tmp_path_factory.mktemp("resized-vocabulary")
    base, adapter, out = root / "base", root / "adapter", root / "out"

    # BASE: hidden 64, 2 layers, vocab 256, untied embeddings, bf16, saved in 100KB shards.
    save_tiny_base_checkpoint("llama", torch.bfloat16, base)
    base_tokenizer = word_level_tokenizer()
    base_tokenizer.chat_template = BASE_CHAT_TEMPLATE
    base_tokenizer.save_pretrained(base)

    # The user's flow: load model and tokenizer, add tokens, resize, LoRA + modules_to_save.
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED_SPECIAL_TOKENS})
    tokenizer.add_tokens(ADDED_WORDS)
    tokenizer.chat_template = ADAPTER_CHAT_TEMPLATE
    assert len(tokenizer) == RESIZED_VOCAB_SIZE
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(stable_seed("resize", "rows"))  # mean_resizing draws the new rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.resize_token_embeddings(len(tokenizer))
        torch.manual_seed(stable_seed("resize", "lora"))  # init_lora_weights=False draws A and B
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=["embed_tokens", "lm_head"],
                init_lora_weights=False,
            ),
        )
        perturb_modules_to_save(peft_model, torch.Generator().manual_seed(7))
        peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    trained = {
        name: wrapper.modules_to_save["default"].weight.detach().clone()
        for name, wrapper in (
            ("model.embed_tokens.weight", peft_model.base_model.model.model.embed_tokens),
            ("lm_head.weight", peft_model.base_model.model.lm_head),
        )
    }

    # For a resized modules_to_save module PEFT (0.21) saves X.weight and X.modules_to_save.weight
    # (both the trained copy) and X.original_module.weight (the resized, untrained base layer).
    merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True))
    return ResizedVocabularyMerge(base, adapter, out, trained)


def test_resized_vocabulary_updates_config_vocab_size_only(resized_vocabulary) -> None:
    """OUT's config.json is the base's with vocab_size 256 -> 272 and nothing else changed."""
    base_config = json.loads((resized_vocabulary.base / "config.json").read_text())
    out_config = json.loads((resized_vocabulary.out / "config.json").read_text())
    assert base_config["vocab_size"] == TINY_VOCAB_SIZE
    assert out_config["vocab_size"] == RESIZED_VOCAB_SIZE
    assert {k: v for k, v in out_config.items() if k != "vocab_size"} == {
        k: v for k, v in base_config.items() if k != "vocab_size"
    }


def test_resized_embeddings_are_the_adapters_trained_copies(resized_vocabulary) -> None:
    """embed_tokens and lm_head in OUT have 272 rows and are exactly the trained copies PEFT
    saved (bf16, as the model was), not the base's rows nor PEFT's saved original_module."""
    out_tensors = read_safetensors_directory(resized_vocabulary.out)
    saved = load_file(resized_vocabulary.adapter / "adapter_model.safetensors")
    base_tensors = read_safetensors_directory(resized_vocabulary.base)
    for name in VOCAB_TENSORS:
        trained = resized_vocabulary.trained_vocab_tensors[name]
        saved_copy = saved[ADAPTER_PREFIX + name]
        assert saved_copy.dtype == torch.bfloat16
        assert torch.equal(saved_copy, trained), f"PEFT saved {name} differently than trained"
        merged = out_tensors[name]
        assert merged.dtype == torch.bfloat16
        assert merged.shape == (RESIZED_VOCAB_SIZE, 64)
        assert torch.equal(merged, trained), name
        # The trained copy differs from the base almost everywhere (bf16 rounding may swallow a
        # tiny perturbation), so a merge that kept or padded the base tensor is caught above.
        differs = trained[:TINY_VOCAB_SIZE] != base_tensors[name]
        assert differs.float().mean() > 0.9, name


def test_resized_merge_equals_peft_merge_and_unload_bit_for_bit(resized_vocabulary) -> None:
    """Every tensor of OUT (q/v merged in bf16, resized vocab tensors, untouched ones) equals
    PEFT's merge_and_unload() of the same resized base and adapter, bit for bit."""
    peft_model = load_resized_peft_model(
        resized_vocabulary.base, resized_vocabulary.adapter, torch.bfloat16
    )
    expected = peft_model.merge_and_unload().state_dict()
    out_tensors = read_safetensors_directory(resized_vocabulary.out)
    assert set(out_tensors) == set(expected)
    mismatched = [
        name
        for name, tensor in expected.items()
        if out_tensors[name].dtype != tensor.dtype or not torch.equal(out_tensors[name], tensor)
    ]
    assert mismatched == []
    # The LoRA deltas are real: the merged projections are not the base's.
    base_tensors = read_safetensors_directory(resized_vocabulary.base)
    for layer in range(2):
        for projection in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{projection}.weight"
            assert not torch.equal(out_tensors[name], base_tensors[name]), name


def test_resized_out_loads_in_transformers_and_matches_unmerged_peft(resized_vocabulary) -> None:
    """AutoModelForCausalLM loads OUT as a bf16 model with no missing, unexpected or mismatched
    keys, and its logits on a prompt with added-token ids match the unmerged PEFT model's within
    bf16 noise; the adapter's own effect on the logits is far larger than that tolerance."""
    tokenizer = AutoTokenizer.from_pretrained(resized_vocabulary.out)
    input_ids = torch.tensor([tokenizer(PROMPT_TEXT, add_special_tokens=False).input_ids])
    assert (input_ids >= TINY_VOCAB_SIZE).sum() == 5, input_ids

    merged_model, loading_info = AutoModelForCausalLM.from_pretrained(
        resized_vocabulary.out, output_loading_info=True
    )
    assert not loading_info["missing_keys"], loading_info
    assert not loading_info["unexpected_keys"], loading_info
    assert not loading_info.get("mismatched_keys"), loading_info
    assert merged_model.dtype == torch.bfloat16
    assert merged_model.config.vocab_size == RESIZED_VOCAB_SIZE

    with torch.no_grad():
        peft_model = load_resized_peft_model(
            resized_vocabulary.base, resized_vocabulary.adapter, torch.bfloat16
        )
        unmerged = peft_model(input_ids=input_ids).logits.double()
        with peft_model.disable_adapter():
            without_adapter = peft_model(input_ids=input_ids).logits.double()
        exact_model = load_resized_peft_model(
            resized_vocabulary.base, resized_vocabulary.adapter, torch.float64
        ).double()
        exact = exact_model(input_ids=input_ids).logits
        merged = merged_model.eval()(input_ids=input_ids).logits.double()

    assert merged.shape == (1, input_ids.shape[1], RESIZED_VOCAB_SIZE)
    tolerance = unmerged_tolerance(unmerged, exact, torch.bfloat16)
    assert float((merged - unmerged).abs().max()) <= tolerance
    # Teeth: the adapter (LoRA deltas + trained embeddings) moves the logits far more.
    assert float((without_adapter - unmerged).abs().max()) > 10 * tolerance


def test_resized_out_has_the_adapters_tokenizer_files(resized_vocabulary) -> None:
    """OUT's tokenizer files are the adapter's, byte for byte (each differs from the base's), OUT
    holds no other files than the model's, and AutoTokenizer.from_pretrained(OUT) knows the added
    tokens with ids 256..271 and the adapter's chat template."""
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert tokenizer_files <= {p.name for p in resized_vocabulary.adapter.iterdir()}
    assert sorted(p.name for p in resized_vocabulary.out.iterdir()) == sorted(
        {
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            *tokenizer_files,
        }
    )
    for name in sorted(tokenizer_files):
        adapter_bytes = (resized_vocabulary.adapter / name).read_bytes()
        assert adapter_bytes != (resized_vocabulary.base / name).read_bytes(), name
        assert (resized_vocabulary.out / name).read_bytes() == adapter_bytes, name

    tokenizer = AutoTokenizer.from_pretrained(resized_vocabulary.out)
    assert len(tokenizer) == RESIZED_VOCAB_SIZE
    added_ids = tokenizer.convert_tokens_to_ids(ADDED_SPECIAL_TOKENS + ADDED_WORDS)
    assert sorted(added_ids) == list(range(TINY_VOCAB_SIZE, RESIZED_VOCAB_SIZE))
    assert set(ADDED_SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert tokenizer.chat_template == ADAPTER_CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------
# 2. What never reaches OUT.
# ---------------------------------------------------------------------------------------------

BASE_SIDE_FILES = {
    "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2, "do_sample": false}\n',
    "tokenizer.json": '{"version": "1.0", "marker": "base tokenizer"}\n',
    "tokenizer_config.json": '{"tokenizer_class": "PreTrainedTokenizerFast", "marker": "base"}\n',
}
# What a Trainer checkpoint folder holds besides the adapter.
ADAPTER_TRAINING_FILES = {
    "README.md": "# My adapter\n\nmodel card written by PEFT\n",
    "trainer_state.json": '{"global_step": 500}\n',
}
ADAPTER_TRAINING_PICKLES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")


@pytest.mark.parametrize("adapter_format", ["safetensors", "bin"])
def test_out_holds_exactly_the_model_files(tmp_path: Path, adapter_format: str) -> None:
    """OUT holds exactly config.json, the weights, generation_config.json and the tokenizer
    files (copied byte for byte from BASE): never adapter_config.json, the adapter weights
    (.safetensors or .bin), the adapter's README.md, training state (training_args.bin,
    optimizer.pt, ...) or the base's pytorch_model.bin lying beside its safetensors."""
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    base_tensors = write_base(base)
    for name, text in BASE_SIDE_FILES.items():
        (base / name).write_text(text)
    torch.save(base_tensors, base / "pytorch_model.bin")

    write_adapter(adapter)
    if adapter_format == "bin":
        (adapter / "adapter_model.safetensors").unlink()
        torch.save(adapter_tensors(), adapter / "adapter_model.bin")
    for name, text in ADAPTER_TRAINING_FILES.items():
        (adapter / name).write_text(text)
    for name in ADAPTER_TRAINING_PICKLES:
        torch.save({"step": 500}, adapter / name)

    summary = merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True))

    assert summary.lora_modules == HANDMADE_LORA_MODULES
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        ["README.md", "config.json", "model.safetensors", *BASE_SIDE_FILES]
    )
    for name, text in BASE_SIDE_FILES.items():
        assert (out / name).read_text() == text, name
    assert not list(tmp_path.glob(".out*")), "a staging folder was left behind"


# ---------------------------------------------------------------------------------------------
# 3. Progress bar and summary line, as a user sees them.
# ---------------------------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LORA_MERGE_DEBUG"}


def run_cli_on_terminal(*args: object, timeout: float = 120) -> tuple[int, str, str]:
    """Run the installed command with stderr on a pseudo-terminal (80x24), stdout on a pipe.

    Returns (exit code, what the terminal showed, stdout).
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            [LORA_MERGE, *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=cli_env(),
        )
    finally:
        os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                process.kill()
                pytest.fail(f"lora-merge did not finish in {timeout} s; terminal: {shown!r}")
            ready, _, _ = select.select([controller], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(controller, 65536)
            except OSError as err:  # Linux: EIO once the last holder of the terminal exits
                if err.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            shown += data
    finally:
        os.close(controller)
    stdout, _ = process.communicate(timeout=timeout)
    return process.returncode, shown.decode("utf-8", errors="replace"), stdout.decode()


def run_cli_in_pipes(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the installed command with stdout and stderr captured: no terminal anywhere."""
    return subprocess.run(
        [LORA_MERGE, *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.fixture
def handmade_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A 2-shard bf16 base and a 4-module q/v adapter written directly with safetensors."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def out_contents(out: Path) -> tuple[dict[str, torch.Tensor], int]:
    """OUT's tensors and its number of safetensors files."""
    return read_safetensors_directory(out), len(list(out.glob("*.safetensors")))


def test_terminal_shows_progress_bar_and_summary(handmade_inputs, tmp_path: Path) -> None:
    """On a terminal, stderr shows tqdm's "merging" byte bar reaching 100% and one summary line
    whose counts are OUT's; stdout stays empty."""
    base, adapter = handmade_inputs
    out = tmp_path / "out"
    code, shown, stdout = run_cli_on_terminal(base, adapter, out)

    assert code == 0, shown
    assert stdout == ""
    assert "merging:" in shown, shown
    assert "100%|" in shown, shown
    assert "B/s" in shown, shown
    summaries = SUMMARY_PATTERN.findall(shown)
    assert len(summaries) == 1, shown
    lora_modules, tensors, copied, shards, where = summaries[0]
    out_tensors, out_shards = out_contents(out)
    assert int(lora_modules) == HANDMADE_LORA_MODULES
    assert int(tensors) == len(out_tensors)
    assert int(copied) == len(out_tensors) - HANDMADE_LORA_MODULES
    assert int(shards) == out_shards == 1
    assert Path(where.strip()).resolve() == out.resolve()


def test_quiet_terminal_shows_nothing(handmade_inputs, tmp_path: Path) -> None:
    """--quiet on a terminal: no bar and no summary; a successful quiet run prints nothing at
    all, and OUT is still written."""
    base, adapter = handmade_inputs
    code, shown, stdout = run_cli_on_terminal(base, adapter, tmp_path / "out", "--quiet")

    assert code == 0, shown
    assert shown == ""
    assert stdout == ""
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_without_terminal_no_bar_but_the_summary(handmade_inputs, tmp_path: Path) -> None:
    """stderr in a pipe (a log file, CI): no bar, no carriage returns, exactly the one summary
    line; stdout is empty."""
    base, adapter = handmade_inputs
    result = run_cli_in_pipes(base, adapter, tmp_path / "out")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "\r" not in result.stderr
    assert "%|" not in result.stderr
    assert "merging" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert SUMMARY_PATTERN.fullmatch(lines[0]), lines[0]
    assert f"merged {HANDMADE_LORA_MODULES} LoRA modules" in lines[0]


def test_json_summary_is_one_object_consistent_with_out(handmade_inputs, tmp_path: Path) -> None:
    """--json prints exactly one JSON object on stdout whose counts are OUT's: tensors,
    LoRA modules, tensors copied unchanged, shards (forced to several with --max-shard-size)
    and bytes_written == the sum of the tensor bytes in OUT."""
    base, adapter = handmade_inputs
    out = tmp_path / "out"
    result = run_cli_in_pipes(base, adapter, out, "--json", "--max-shard-size", "20KB")

    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, result.stdout
    summary = json.loads(result.stdout)
    assert set(summary) == {
        "out",
        "tensors",
        "lora_modules",
        "replaced",
        "copied",
        "shards",
        "resumed_shards",
        "bytes_written",
        "seconds",
        "base",
        "adapter",
        "files",
        "lora_modules_by_layer",
        "plan_seconds",
        "write_seconds",
        "warnings",
        "pushed_to",
        "commit_url",
        "threads",
        "gb_per_second",
    }
    base_tensors = read_safetensors_directory(base)
    out_tensors, out_shards = out_contents(out)
    unchanged = [name for name, t in out_tensors.items() if torch.equal(t, base_tensors[name])]
    assert Path(summary["out"]).resolve() == out.resolve()
    assert summary["tensors"] == len(out_tensors) == len(base_tensors)
    assert summary["lora_modules"] == HANDMADE_LORA_MODULES
    assert summary["replaced"] == 0
    assert summary["copied"] == len(unchanged) == len(out_tensors) - HANDMADE_LORA_MODULES
    assert summary["shards"] == out_shards > 1
    assert summary["resumed_shards"] == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert summary["bytes_written"] == sum(
        t.numel() * t.element_size() for t in out_tensors.values()
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == summary["bytes_written"]
    assert isinstance(summary["seconds"], float) and summary["seconds"] >= 0
    assert isinstance(summary["threads"], int) and summary["threads"] >= 1
    assert isinstance(summary["gb_per_second"], float) and summary["gb_per_second"] >= 0
    # Not quiet: the human summary still goes to stderr, never to stdout.
    assert SUMMARY_PATTERN.search(result.stderr), result.stderr


def test_tokenizer_files_come_as_one_set_from_the_adapter(tmp_path: Path) -> None:
    """A base-only tokenizer file never sits beside the adapter's tokenizer; other files fall back to the base."""
    from lora_merge.finish.folder import copy_side_files

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    for folder in (base, adapter, out):
        folder.mkdir()
    (base / "tokenizer.json").write_text("base tokenizer")
    (base / "special_tokens_map.json").write_text("stale base map")
    (base / "generation_config.json").write_text("base generation")
    (adapter / "tokenizer.json").write_text("adapter tokenizer")

    copied = copy_side_files(out, base, adapter)

    assert sorted(copied) == ["generation_config.json", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == "adapter tokenizer"
    assert not (out / "special_tokens_map.json").exists()
    assert (out / "generation_config.json").read_text() == "base generation"
