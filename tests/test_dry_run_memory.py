"""``--dry-run``'s memory line bounds the memory the merge then uses (issue 14), and the
memory it counts for folding the scale into A is made only where that cannot overflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import write_adapter
from merge_process import LORA_MERGE
from safetensors.torch import save_file

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
