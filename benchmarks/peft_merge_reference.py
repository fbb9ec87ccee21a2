"""Reference merge with transformers + PEFT, the way most people do it.

Loads the whole base model in bf16, attaches the LoRA adapter, merges it with
``merge_and_unload()`` and saves the merged model. ``bench_merge.py`` runs this
script in its own subprocess to measure its wall time and peak RSS; it can
also be run by hand::

    .venv/bin/python benchmarks/peft_merge_reference.py BASE ADAPTER OUT

A "Found missing adapter keys" warning from PEFT is turned into an error, so
the benchmark never times a merge that silently merged nothing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def merge_with_peft(base_model: Path, adapter: Path, output: Path) -> None:
    """Merges a LoRA adapter into a base model with PEFT and saves it.

    Args:
        base_model: Hugging Face model folder.
        adapter: PEFT LoRA adapter folder.
        output: Folder to save the merged model to.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("error", message="Found missing adapter keys")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(model, adapter)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments, without the program name; ``None`` means ``sys.argv``.

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_model", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    merge_with_peft(args.base_model, args.adapter, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
