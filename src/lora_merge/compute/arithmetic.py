"""The merge arithmetic in words, for the model card and shard metadata. Torch-free.

Kept apart from :mod:`lora_merge.compute.lora` (which computes it) so that the
shard headers can be written before ``import torch`` (see
:mod:`lora_merge.run.copy_ahead`).
"""

from __future__ import annotations

# The arithmetic, in one line, for the model card and shard metadata.
MERGE_ARITHMETIC = (
    "W + scale * B @ A per module (PEFT's merge), computed in float32 (float64 for "
    "32-bit outputs) and rounded once to the output dtype"
)
UNMERGE_ARITHMETIC = (
    "--unmerge: W - scale * B @ A per module (the adapter removed; the scales listed are "
    "negated), computed in float32 (float64 for 32-bit outputs) and rounded once"
)


# No "|" in it: the model card shows it in a Markdown table.
DORA_ARITHMETIC = (
    "DoRA modules: m / norm(V) * V with V = W + scale * B @ A and one norm per output feature"
)


def merge_arithmetic(has_dora: bool) -> str:
    """:data:`MERGE_ARITHMETIC`, plus DoRA's rescaling when the adapter has DoRA modules."""
    return f"{MERGE_ARITHMETIC}; {DORA_ARITHMETIC}" if has_dora else MERGE_ARITHMETIC
