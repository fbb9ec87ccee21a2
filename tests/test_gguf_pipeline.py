"""The README's GGUF pipeline, run as written: lora-merge's output converted by llama.cpp's converter.

The README's block (``lora-merge ... --json``, then llama.cpp's
``convert_hf_to_gguf.py``) runs in bash on a tiny Llama and a tiny Mixtral (an
MoE whose experts the converter stacks), each with a PEFT LoRA. The converter is
llama.cpp's own, unpacked unbuilt from a released source package (see
``tests/support/llama_cpp.py``; ``make install`` puts it in ``.cache/llama.cpp``).
The GGUF file is read back with the reader of the converter's own ``gguf``
package, and checked against what lora-merge wrote, as an independent table of
llama.cpp's tensor names says it should hold: every name, shape and GGML type,
and the bytes of every tensor the converter does not permute (bf16 copied bit
for bit, norms widened exactly to float32). The query and key projections are
permuted for llama.cpp's rotary layout: each holds the same rows as ours.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_models import VOCAB_SIZE, save_convertible_base, save_lora_adapter
from llama_cpp import converter_dir, converter_missing
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- gguf-pipeline: run as written by tests/test_gguf_pipeline.py -->"
LAYERS, EXPERTS = 2, 4

# llama.cpp's names for the llama architecture (gguf-py's constants), ours on the right.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
DENSE_MLP_NAMES = {
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Mixtral's checkpoint keeps one w1 (gate), w3 (up), w2 (down) per expert; GGUF stacks them.
EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
# Permuted by the converter for llama.cpp's rotary embedding (rows reordered per head).
PERMUTED = {"attn_q", "attn_k"}


def expected_tensors(family: str, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF name -> the tensor of ours it must hold (experts stacked along a new first axis).

    Fails if a tensor of ours has no place in the GGUF file.
    """
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return ours[name]

    expected = {gguf: take(name) for gguf, name in GLOBAL_NAMES.items()}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        names = dict(BLOCK_NAMES)
        if family == "llama":
            names.update(DENSE_MLP_NAMES)
        else:
            names["ffn_gate_inp"] = "block_sparse_moe.gate"
            for gguf, weight in EXPERT_NAMES.items():
                experts = [
                    take(f"{prefix}.block_sparse_moe.experts.{e}.{weight}.weight")
                    for e in range(EXPERTS)
                ]
                expected[f"blk.{layer}.{gguf}.weight"] = torch.stack(experts)
        for gguf, name in names.items():
            expected[f"blk.{layer}.{gguf}.weight"] = take(f"{prefix}.{name}.weight")
    assert used == set(ours), f"not in the GGUF file: {sorted(set(ours) - used)}"
    return expected


def expected_type(name: str, tensor: torch.Tensor) -> str:
    """``--outtype bf16``: the converter keeps 1-D tensors and the MoE router in float32."""
    return "F32" if tensor.dim() == 1 or ".ffn_gate_inp." in name else "BF16"


def readme_pipeline() -> str:
    """The bash block that follows the marker in README.md."""
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"README.md lost the GGUF pipeline block ({MARKER})"
    match = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert match, "no ```bash block after the GGUF pipeline marker"
    return match.group(1)


@pytest.fixture(scope="module")
def converter() -> Path:
    if sys.platform == "win32":
        pytest.skip("the README's pipeline is a POSIX shell script (bash)")
    root = converter_dir()
    reason = converter_missing(root)
    if reason and os.environ.get("CI"):  # `make test` fetches it: CI must not skip quietly
        pytest.fail(f"{reason} (CI must run this test: `make install` provides it)")
    if reason:
        pytest.skip(reason)
    return root


@pytest.fixture(scope="module")
def gguf_module(converter: Path):
    """The ``gguf`` package of the converter's release (its reader), imported from gguf-py."""
    sys.path.insert(0, str(converter / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.remove(str(converter / "gguf-py"))
    return gguf


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_readme_pipeline_converts_our_output_to_the_gguf_llama_cpp_expects(
    family: str, converter: Path, gguf_module, tmp_path: Path
) -> None:
    save_convertible_base(family, tmp_path / "base")
    save_lora_adapter(family, tmp_path / "base", tmp_path / "adapter")
    (tmp_path / "llama.cpp").symlink_to(converter, target_is_directory=True)
    environment = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}  # fmt: skip
    run = subprocess.run(
        ["bash", "-c", readme_pipeline()],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    summary = json.loads((tmp_path / "merged.json").read_text())
    assert Path(summary["out"]) == (tmp_path / "merged").resolve()
    assert summary["lora_modules"] > 0 and summary["warnings"] == []
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    expected = expected_tensors(family, ours)

    reader = gguf_module.GGUFReader(tmp_path / "merged-bf16.gguf")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    for name, tensor in tensors.items():
        want = expected[name]
        assert tensor.tensor_type.name == expected_type(name, want), name
        # GGML lists dimensions fastest first: the reverse of torch's order.
        assert [int(n) for n in tensor.shape][::-1] == list(want.shape), name
        if tensor.tensor_type.name == "BF16":
            got = torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16).reshape(want.shape)
        else:  # float32, widened from our bf16: exact
            got = torch.from_numpy(np.array(tensor.data)).reshape(want.shape)
            want = want.float()
        if name.split(".")[2 if name.startswith("blk.") else 0] in PERMUTED:
            assert torch.equal(rows_sorted(got), rows_sorted(want)), name
        else:
            assert torch.equal(got, want), name
    fields = reader.fields
    assert field_value(fields["llama.block_count"]) == LAYERS
    assert field_value(fields["llama.vocab_size"]) == VOCAB_SIZE
    if family == "mixtral":
        assert field_value(fields["llama.expert_count"]) == EXPERTS


def rows_sorted(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-D tensor in a canonical order (by their bytes), for a permutation check."""
    rows = tensor.float().numpy()
    order = sorted(range(rows.shape[0]), key=lambda index: rows[index].tobytes())
    return tensor[order]


def field_value(field) -> int:
    """The integer a GGUF key-value field holds."""
    return int(field.parts[field.data[0]][0])
