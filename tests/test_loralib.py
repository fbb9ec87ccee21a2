"""loralib (microsoft/LoRA) checkpoints: a bare ``lora_state_dict`` file with --rank/--alpha.

The oracle is loralib itself: its layers, given the base weights and the saved A and B, merge
in ``eval()`` (``merge_weights=True``). Run in float64 that is the exact merge; run in the
checkpoint's dtype it is what a loralib user gets. lora-merge must be within half an ulp of the
first and never further from it than the second. Covered: Linear with and without
fan_in_fan_out (GPT-2's Conv1D layout, a square one decided by the architecture), Embedding
(A and B the other way round), and MergedLinear (fused qkv) with every group and with
``enable_lora=[True, False, True]``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import loralib
import pytest
import torch
from merge_oracle import read_safetensors_directory, ulp
from merge_process import LORA_MERGE
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge
from lora_merge.errors import EXIT_INVALID_INPUT, EXIT_USAGE, InvalidInputError, UsageError

RANK, ALPHA = 4, 6  # scale 1.5: not a power of two
PROMPT = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _layer(kind: str, shape: tuple[int, ...], **kwargs) -> torch.nn.Module:
    """A loralib layer for a base weight of ``shape`` (as stored)."""
    common = {"r": RANK, "lora_alpha": ALPHA, "merge_weights": True}
    if kind == "embedding":
        return loralib.Embedding(shape[0], shape[1], **common)
    fan_in_fan_out = kwargs.get("fan_in_fan_out", False)
    in_features, out_features = shape if fan_in_fan_out else shape[::-1]
    if kind == "merged":
        return loralib.MergedLinear(in_features, out_features, **common, **kwargs)
    return loralib.Linear(in_features, out_features, **common, **kwargs)


def _loralib_checkpoint(base: dict[str, torch.Tensor], layers: dict, path: Path, seed: int):
    """Save ``lora_state_dict`` of the layers.

    Returns:
        loralib's merges in the weight's dtype, in float64, and in float64 of the absolute
        values (``|W| + s * |B| @ |A|``, the scale of the arithmetic's rounding errors).
    """
    generator = torch.Generator().manual_seed(seed)
    saved, merged, exact, magnitude = {}, {}, {}, {}
    for module, (kind, kwargs) in layers.items():
        weight = base[f"{module}.weight"]
        layer = _layer(kind, tuple(weight.shape), **kwargs)
        with torch.no_grad():
            layer.weight.copy_(weight.float())
            for name in ("lora_A", "lora_B"):
                parameter = getattr(layer, name)
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        saved.update(
            {
                f"{module}.{k}": v.detach().clone()
                for k, v in layer.state_dict().items()
                if "lora_" in k
            }
        )
        for dtype, into, absolute in (
            (weight.dtype, merged, False),
            (torch.float64, exact, False),
            (torch.float64, magnitude, True),
        ):
            copy = _layer(kind, tuple(weight.shape), **kwargs).to(dtype)
            state = {k: v.to(dtype) for k, v in layer.state_dict().items()}
            copy.load_state_dict({k: v.abs() if absolute else v for k, v in state.items()})
            with torch.no_grad():  # the base value itself, not via float32
                copy.weight.copy_(weight.to(dtype).abs() if absolute else weight.to(dtype))
            copy.train(False)  # loralib merges here
            into[f"{module}.weight"] = copy.weight.detach().clone()
    torch.save(saved, path)
    return merged, exact, magnitude


GPT2_LAYERS = {
    "transformer.h.0.attn.c_attn": (
        "merged",
        {"enable_lora": [True, False, True], "fan_in_fan_out": True},
    ),
    "transformer.h.1.attn.c_attn": (
        "merged",
        {"enable_lora": [True, True, True], "fan_in_fan_out": True},
    ),
    "transformer.h.0.mlp.c_fc": ("linear", {"fan_in_fan_out": True}),
    "transformer.h.1.attn.c_proj": ("linear", {"fan_in_fan_out": True}),  # square (64, 64)
}
LLAMA_LAYERS = {
    "model.embed_tokens": ("embedding", {}),
    "model.layers.0.self_attn.q_proj": ("linear", {}),
    "model.layers.1.mlp.down_proj": ("linear", {}),
}


@pytest.mark.parametrize(
    ("family", "dtype", "layers", "extra"),
    [
        ("gpt2", torch.float32, GPT2_LAYERS, ["1,0,1"]),
        ("llama", torch.bfloat16, LLAMA_LAYERS, []),
    ],
    ids=["gpt2-fp32-merged-linear", "llama-bf16-embedding-linear"],
)
def test_loralib_checkpoint_merges_as_loralib_does_but_rounded_once(
    family, dtype, layers, extra, tmp_path, tiny_base_checkpoint
):
    base_dir = tiny_base_checkpoint(family, dtype)
    base = read_safetensors_directory(base_dir)
    checkpoint = tmp_path / "lora.pt"
    loralib_merged, exact, magnitude = _loralib_checkpoint(
        base, layers, checkpoint, seed=len(layers)
    )
    out = tmp_path / "out"
    merge(
        MergeOptions(
            base=base_dir,
            adapter=checkpoint,
            out=out,
            quiet=True,
            rank=RANK,
            alpha=ALPHA,
            enable_lora=extra[0] if extra else None,
            verify=True,
        )
    )
    ours = read_safetensors_directory(out)
    closer = 0
    for name, expected in exact.items():
        assert not torch.equal(ours[name], base[name]), name
        our_error = (ours[name].double() - expected).abs()
        loralib_error = (loralib_merged[name].double() - expected).abs()
        # The merge's own arithmetic (float32 for 16-bit outputs, float64 for float32) adds
        # at most (r·k + 2)·u·(|W| + s·|B|@|A|): visible only where W and the delta cancel.
        unit = 2.0**-53 if dtype == torch.float32 else 2.0**-24
        slack = (3 * RANK + 2) * unit * magnitude[name]
        assert bool((our_error <= 0.5 * ulp(expected, dtype) + slack).all()), name
        assert bool((our_error <= loralib_error + slack).all()), name
        closer += int((our_error < loralib_error).sum())
    # loralib rounds the delta, then the sum (in bf16, every step). Measured: every element that
    # differs from loralib's merge is closer to float64 (gpt2 fp32: 4217, 6355, 8458, 2082
    # elements; llama bf16: 8998, 2304, 4572); max error 0.5 ulp, or within the cancellation
    # bound in bf16.
    assert closer > 100
    untouched = set(base) - set(exact)
    assert all(torch.equal(ours[name], base[name]) for name in untouched)

    # The merged model computes what the exactly merged one does.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    state = reference.state_dict()
    for name, value in exact.items():
        state[name.removeprefix("transformer.") if name not in state else name].copy_(value)
    with torch.no_grad():
        ours_logits, exact_logits = (
            model(input_ids=PROMPT).logits,
            reference(input_ids=PROMPT).logits,
        )
    tolerance = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert float((ours_logits - exact_logits).abs().max()) <= tolerance * float(
        exact_logits.abs().max()
    )


def test_merged_linear_with_some_groups_needs_enable_lora(tmp_path, tiny_base_checkpoint):
    base_dir = tiny_base_checkpoint("gpt2", torch.float32)
    base = read_safetensors_directory(base_dir)
    checkpoint = tmp_path / "lora.pt"
    layers = {"transformer.h.0.attn.c_attn": GPT2_LAYERS["transformer.h.0.attn.c_attn"]}
    _loralib_checkpoint(base, layers, checkpoint, seed=3)
    result = subprocess.run(
        [LORA_MERGE, base_dir, checkpoint, tmp_path / "out", "--rank", "4", "--alpha", "6"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == EXIT_INVALID_INPUT
    assert "MergedLinear with 2 of 3 output groups adapted" in result.stderr
    assert "--enable-lora" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_without_rank_and_a_folder_with_rank_are_explained(tmp_path, tiny_base_checkpoint):
    base_dir = tiny_base_checkpoint("gpt2", torch.float32)
    checkpoint = tmp_path / "lora.pt"
    torch.save({"transformer.h.0.mlp.c_fc.lora_A": torch.ones(4, 64)}, checkpoint)
    with pytest.raises(InvalidInputError, match="pass --rank R --alpha A"):
        merge(MergeOptions(base=base_dir, adapter=checkpoint, out=tmp_path / "out"))
    with pytest.raises(InvalidInputError, match="for a PEFT adapter folder leave them out"):
        merge(MergeOptions(base=base_dir, adapter=tmp_path, out=tmp_path / "o", rank=4, alpha=8))
    with pytest.raises(UsageError, match="needs both --rank and --alpha"):
        merge(MergeOptions(base=base_dir, adapter=checkpoint, out=tmp_path / "o", rank=4))


def test_loralib_conv_is_refused_by_name(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"encoder.conv.conv.weight": torch.ones(8, 4, 3, 3)}, base / "model.safetensors")
    checkpoint = tmp_path / "lora.pt"
    torch.save(
        {"encoder.conv.lora_A": torch.ones(12, 12), "encoder.conv.lora_B": torch.ones(24, 12)},
        checkpoint,
    )
    with pytest.raises(InvalidInputError, match="loralib ConvLoRA"):
        merge(MergeOptions(base=base, adapter=checkpoint, out=tmp_path / "out", rank=4, alpha=4))


LORALIB_OPTIONS = ["--rank", "4", "--alpha", "8", "--enable-lora"]


def test_cli_documents_and_checks_the_loralib_options(tmp_path, tiny_base_checkpoint):
    help_text = subprocess.run(
        [LORA_MERGE, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for option in ("--unmerge", "--rank", "--alpha", "--enable-lora"):
        assert option in help_text
    base_dir = tiny_base_checkpoint("gpt2", torch.float32)
    checkpoint = tmp_path / "lora.pt"
    torch.save({"transformer.h.0.mlp.c_fc.lora_A": torch.ones(4, 64)}, checkpoint)
    result = subprocess.run(
        [LORA_MERGE, base_dir, checkpoint, tmp_path / "out", *LORALIB_OPTIONS, "1,maybe,1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == EXIT_USAGE  # a bad option value, found before any input is read
    assert "'maybe' is not true/false or 1/0" in result.stderr
    assert not (tmp_path / "out").exists()
