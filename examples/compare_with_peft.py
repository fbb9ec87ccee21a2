"""Check a merged model against PEFT: same logits as the unmerged adapter.

Usage: python examples/compare_with_peft.py FOLDER

FOLDER holds base/, adapter/ (from build_tiny_model.py) and merged/ (from
lora-merge). Loads merged/ with plain transformers and base/ + adapter/ with
PEFT (not merged), runs both on the same tokens and prints the largest logit
difference. Exits 1 if it is larger than bf16 rounding can explain.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

# Merged weights are rounded to bf16 once; PEFT's unmerged forward adds the
# LoRA branch to bf16 activations. Both are bf16 computations of the same
# function, so logits agree to a few bf16 ulps of their magnitude.
TOLERANCE = 0.05


def compare(folder: Path) -> float:
    """Largest absolute logit difference between merged/ and PEFT's unmerged model."""
    tokens = torch.arange(0, 32).reshape(1, -1)
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.bfloat16)
    unmerged = PeftModel.from_pretrained(base, folder / "adapter")
    with torch.no_grad():
        expected = unmerged(tokens).logits.float()
        actual = merged(tokens).logits.float()
    return (expected - actual).abs().max().item()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    difference = compare(Path(sys.argv[1]))
    verdict = "OK" if difference <= TOLERANCE else "MISMATCH"
    print(f"{verdict}: merged model vs PEFT (unmerged) max |logit difference| = {difference:.4f}")
    sys.exit(0 if verdict == "OK" else 1)
