"""Synthetic FP8 block-wise and MXFP4 checkpoints (and their bf16 twins) with LoRA adapters.

Two released layouts, at their real widths or scaled down:

* ``deepseek-v3``: DeepSeek-V3/R1 (deepseek-ai/DeepSeek-V3 ``config.json`` and
  ``model.safetensors.index.json``): hidden 7168, MLA attention
  (``q_a_proj`` 1536x7168, ``q_b_proj`` 24576x1536, ``kv_a_proj_with_mqa``
  576x7168, ``kv_b_proj`` 32768x512, ``o_proj`` 7168x16384 and the two
  latent norms), 256 routed experts of 2048 (``mlp.experts.{j}.gate_proj``,
  ``up_proj``, ``down_proj``) plus one shared expert, the router
  (``mlp.gate.weight``, ``e_score_correction_bias``); every projection F8_E4M3
  with ``weight_scale_inv`` F32 per 128x128 block (576 rows: a partial edge
  block), as released. ``--layers`` MoE layers (the release has 58 of them
  after 3 dense ones: this is a slice).
* ``gpt-oss-20b``: openai/gpt-oss-20b: hidden 2880, 24 layers, 64 query heads
  of 64 and 8 key-value heads (biases, sinks), 32 experts of 2880 stored
  MXFP4 (``mlp.experts.gate_up_proj_blocks`` (32, 5760, 90, 16),
  ``_scales`` (32, 5760, 90), ``down_proj_blocks`` (32, 2880, 90, 16),
  ``_scales``), bf16 expert biases, router and attention, vocabulary 201088.

``--format bf16`` writes the same model with every quantized tensor as the
bf16 tensor transformers dequantizes it to (same names, same logical shapes),
the baseline of ``bench_native_formats.py``. The ``-mini`` shapes keep the
layouts at a size a laptop merges in seconds.

Files are written by a streaming writer (a bounded chunk of values at a time,
never a whole tensor), in shards of at most ``--shard-size`` bytes with an
index, so a 40 GB slice is written in a few tens of MB of memory. The adapter
(PEFT layout) puts LoRA on the attention projections and on every expert
(DeepSeek: each expert's and the shared expert's projections; gpt-oss:
``target_parameters`` on the fused experts).

Usage::

    .venv/bin/python benchmarks/synthetic_native_checkpoints.py --shape deepseek-v3 \\
        --layers 3 --format fp8 --workdir /data/bench
    .venv/bin/python benchmarks/synthetic_native_checkpoints.py --shape gpt-oss-20b \\
        --format mxfp4 --workdir /data/bench

Each prints one JSON line: ``{"base": PATH, "adapter": PATH, "bytes": N}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_merge.io.safetensors_header import HeaderTensor, encode_header

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_checkpoints import GENERATION_CHUNK_ELEMENTS, adapter_config, tensor_seed

FP8_BLOCK = 128
MXFP4_GROUP = 32
DTYPE_SIZES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}
BASE_STD = 0.02
LORA_STD = 0.01


@dataclass(frozen=True)
class Spec:
    """One stored tensor and how its values are drawn (``normal``, ``ones``, ``fp8``,
    ``fp8_scale``, ``mxfp4_blocks``, ``mxfp4_scales``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str = "normal"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class DeepSeekShape:
    hidden: int = 7168
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    heads: int = 128
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    experts: int = 256
    expert_width: int = 2048
    vocab: int = 129280


@dataclass(frozen=True)
class GptOssShape:
    hidden: int = 2880
    layers: int = 24
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    experts: int = 32
    expert_width: int = 2880
    vocab: int = 201088


SHAPES: dict[str, DeepSeekShape | GptOssShape] = {
    "deepseek-v3": DeepSeekShape(),
    "deepseek-v3-mini": DeepSeekShape(
        hidden=1024,
        q_lora_rank=256,
        kv_lora_rank=128,
        heads=8,
        qk_nope=64,
        qk_rope=32,
        v_head=64,
        experts=16,
        expert_width=256,
        vocab=4096,
    ),
    # The real widths (every projection as released) with 8 routed experts instead of 256 and
    # a small vocabulary: a layer is 0.6 GB of FP8 (1.2 GB as bf16), so the benchmark times
    # decoding at the real row widths on a laptop's disk.
    "deepseek-v3-widths": DeepSeekShape(experts=8, vocab=4096),
    "gpt-oss-20b": GptOssShape(),
    # gpt-oss-20b's widths and 32 experts with a small vocabulary (take --layers 1: 0.4 GB
    # of MXFP4, 1.6 GB as bf16, a layer).
    "gpt-oss-20b-widths": GptOssShape(vocab=4096),
    "gpt-oss-mini": GptOssShape(
        hidden=512,
        layers=2,
        heads=8,
        kv_heads=2,
        head_dim=64,
        experts=8,
        expert_width=512,
        vocab=4096,
    ),
}


def fp8_linear(name: str, rows: int, cols: int, quantized: bool) -> list[Spec]:
    """A linear weight block-wise FP8 with its scales, or its bf16 twin."""
    if not quantized:
        return [Spec(name, (rows, cols), "BF16")]
    grid = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    return [
        Spec(name, (rows, cols), "F8_E4M3", "fp8"),
        Spec(f"{name}_scale_inv", grid, "F32", "fp8_scale"),
    ]


def deepseek_specs(shape: DeepSeekShape, layers: int, quantized: bool) -> list[Spec]:
    specs = [
        Spec("model.embed_tokens.weight", (shape.vocab, shape.hidden), "BF16"),
        Spec("model.norm.weight", (shape.hidden,), "BF16", "ones"),
        Spec("lm_head.weight", (shape.vocab, shape.hidden), "BF16"),
    ]
    q_width = shape.heads * (shape.qk_nope + shape.qk_rope)
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        attention = f"{prefix}.self_attn"
        for name, rows, cols in (
            ("q_a_proj", shape.q_lora_rank, shape.hidden),
            ("q_b_proj", q_width, shape.q_lora_rank),
            ("kv_a_proj_with_mqa", shape.kv_lora_rank + shape.qk_rope, shape.hidden),
            ("kv_b_proj", shape.heads * (shape.qk_nope + shape.v_head), shape.kv_lora_rank),
            ("o_proj", shape.hidden, shape.heads * shape.v_head),
        ):
            specs += fp8_linear(f"{attention}.{name}.weight", rows, cols, quantized)
        specs += [
            Spec(f"{attention}.q_a_layernorm.weight", (shape.q_lora_rank,), "BF16", "ones"),
            Spec(f"{attention}.kv_a_layernorm.weight", (shape.kv_lora_rank,), "BF16", "ones"),
            Spec(f"{prefix}.input_layernorm.weight", (shape.hidden,), "BF16", "ones"),
            Spec(f"{prefix}.post_attention_layernorm.weight", (shape.hidden,), "BF16", "ones"),
            Spec(f"{prefix}.mlp.gate.weight", (shape.experts, shape.hidden), "BF16"),
            Spec(f"{prefix}.mlp.gate.e_score_correction_bias", (shape.experts,), "F32", "ones"),
        ]
        experts = [f"{prefix}.mlp.experts.{j}" for j in range(shape.experts)]
        for module in [*experts, f"{prefix}.mlp.shared_experts"]:
            specs += fp8_linear(
                f"{module}.gate_proj.weight", shape.expert_width, shape.hidden, quantized
            )
            specs += fp8_linear(
                f"{module}.up_proj.weight", shape.expert_width, shape.hidden, quantized
            )
            specs += fp8_linear(
                f"{module}.down_proj.weight", shape.hidden, shape.expert_width, quantized
            )
    return specs


def gpt_oss_specs(shape: GptOssShape, quantized: bool) -> list[Spec]:
    specs = [
        Spec("model.embed_tokens.weight", (shape.vocab, shape.hidden), "BF16"),
        Spec("model.norm.weight", (shape.hidden,), "BF16", "ones"),
        Spec("lm_head.weight", (shape.vocab, shape.hidden), "BF16"),
    ]
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        for name, rows, cols in (
            ("q_proj", q, shape.hidden),
            ("k_proj", kv, shape.hidden),
            ("v_proj", kv, shape.hidden),
            ("o_proj", shape.hidden, q),
        ):
            specs += [
                Spec(f"{prefix}.self_attn.{name}.weight", (rows, cols), "BF16"),
                Spec(f"{prefix}.self_attn.{name}.bias", (rows,), "BF16"),
            ]
        specs += [
            Spec(f"{prefix}.self_attn.sinks", (shape.heads,), "BF16"),
            Spec(f"{prefix}.input_layernorm.weight", (shape.hidden,), "BF16", "ones"),
            Spec(f"{prefix}.post_attention_layernorm.weight", (shape.hidden,), "BF16", "ones"),
            Spec(f"{prefix}.mlp.router.weight", (shape.experts, shape.hidden), "BF16"),
            Spec(f"{prefix}.mlp.router.bias", (shape.experts,), "BF16"),
        ]
        experts = f"{prefix}.mlp.experts"
        for name, out, width in (
            ("gate_up_proj", 2 * shape.expert_width, shape.hidden),
            ("down_proj", shape.hidden, shape.expert_width),
        ):
            specs.append(Spec(f"{experts}.{name}_bias", (shape.experts, out), "BF16"))
            if quantized:
                groups = width // MXFP4_GROUP
                specs += [
                    Spec(
                        f"{experts}.{name}_blocks",
                        (shape.experts, out, groups, 16),
                        "U8",
                        "mxfp4_blocks",
                    ),
                    Spec(
                        f"{experts}.{name}_scales",
                        (shape.experts, out, groups),
                        "U8",
                        "mxfp4_scales",
                    ),
                ]
            else:  # transformers' layout after dequantizing: (experts, in, out)
                specs.append(Spec(f"{experts}.{name}", (shape.experts, width, out), "BF16"))
    return specs


def chunks(spec: Spec, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's bytes in chunks of at most GENERATION_CHUNK_ELEMENTS values."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    remaining = math.prod(spec.shape)
    while remaining:
        count = min(remaining, GENERATION_CHUNK_ELEMENTS)
        remaining -= count
        if spec.kind == "ones":
            values = torch.ones(count)
        elif spec.kind in ("mxfp4_blocks", "mxfp4_scales"):
            low, high = (0, 256) if spec.kind == "mxfp4_blocks" else (118, 124)
            yield torch.randint(low, high, (count,), generator=generator, dtype=torch.uint8)
            continue
        elif spec.kind == "fp8":
            values = torch.randn(count, generator=generator).mul_(100)  # FP8 codes around +-100
        elif spec.kind == "fp8_scale":
            values = torch.rand(count, generator=generator).mul_(2e-4).add_(1e-4)
        else:
            values = torch.randn(count, generator=generator).mul_(BASE_STD)
        dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}
        yield values.to(dtype[spec.dtype])


def write_shards(folder: Path, specs: Sequence[Spec], seed: int, shard_size: int) -> int:
    """Write ``specs`` in order into shards of at most ``shard_size`` bytes and an index."""
    shards: list[list[Spec]] = [[]]
    for spec in specs:
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + spec.nbytes > shard_size:
            shards.append([])
        shards[-1].append(spec)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        for spec in shard:
            weight_map[spec.name] = file_name
        header = encode_header(
            [HeaderTensor(spec.name, spec.dtype, tuple(spec.shape), spec.nbytes) for spec in shard]
        )
        with (folder / file_name).open("wb") as file:
            file.write(header)
            for spec in shard:
                for chunk in chunks(spec, seed):
                    file.write(chunk.view(torch.uint8).numpy().tobytes())
        print(f"  wrote {folder.name}/{file_name}", file=sys.stderr, flush=True)
    total = sum(s.nbytes for s in specs)
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return total


def deepseek_config(shape: DeepSeekShape, layers: int, quantized: bool) -> dict[str, object]:
    """deepseek-ai/DeepSeek-V3's config.json fields, at ``shape``'s widths and every layer MoE."""
    config: dict[str, object] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": shape.hidden,
        "intermediate_size": 18432 if shape.hidden == 7168 else 4 * shape.hidden,
        "moe_intermediate_size": shape.expert_width,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 0,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "q_lora_rank": shape.q_lora_rank,
        "kv_lora_rank": shape.kv_lora_rank,
        "qk_nope_head_dim": shape.qk_nope,
        "qk_rope_head_dim": shape.qk_rope,
        "v_head_dim": shape.v_head,
        "n_routed_experts": shape.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if quantized:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    return config


def gpt_oss_config(shape: GptOssShape, quantized: bool) -> dict[str, object]:
    """openai/gpt-oss-20b's config.json fields at ``shape``'s widths."""
    config: dict[str, object] = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.expert_width,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "num_local_experts": shape.experts,
        "num_experts_per_tok": 4,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if quantized:
        config["quantization_config"] = {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        }
    return config


def adapter_specs(shape: DeepSeekShape | GptOssShape, layers: int, rank: int) -> list[Spec]:
    """The LoRA factors (fp32) of the attention projections and the experts."""
    specs = []

    def lora(module: str, rows: int, cols: int) -> None:
        specs.append(Spec(f"base_model.model.{module}.lora_A.weight", (rank, cols), "F32"))
        specs.append(Spec(f"base_model.model.{module}.lora_B.weight", (rows, rank), "F32"))

    if isinstance(shape, DeepSeekShape):
        for spec in deepseek_specs(shape, layers, quantized=False):
            parts = spec.name.split(".")
            # kv_a_proj_with_mqa (576 rows: blocks of 128 end inside it) is the one weight
            # with partial FP8 blocks; target_modules names it, so it gets factors too.
            if len(spec.shape) == 2 and "_proj" in parts[-2]:
                lora(spec.name.removesuffix(".weight"), *spec.shape)
        return specs
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        lora(f"{prefix}.self_attn.q_proj", q, shape.hidden)
        lora(f"{prefix}.self_attn.v_proj", kv, shape.hidden)
        # PEFT's ParamWrapper on fused experts: A (r * E, in), B (out, r * E).
        experts = f"{prefix}.mlp.experts"
        e = shape.experts
        specs.append(
            Spec(
                f"base_model.model.{experts}.base_layer.lora_A.weight",
                (rank * e, shape.hidden),
                "F32",
            )
        )
        specs.append(
            Spec(
                f"base_model.model.{experts}.base_layer.lora_B.weight",
                (2 * shape.expert_width, rank * e),
                "F32",
            )
        )
        specs.append(
            Spec(f"base_model.model.{experts}.lora_A.weight", (rank * e, shape.expert_width), "F32")
        )
        specs.append(
            Spec(f"base_model.model.{experts}.lora_B.weight", (shape.hidden, rank * e), "F32")
        )
    return specs


def build(
    shape_name: str,
    layers: int | None,
    format: str,
    workdir: Path,
    rank: int,
    shard_size: int,
    seed: int,
    experts: int | None = None,
    vocab: int | None = None,
) -> dict:
    shape = SHAPES[shape_name]
    quantized = format != "bf16"
    if isinstance(shape, DeepSeekShape):
        layers = 3 if layers is None else layers
        name = f"{shape_name}-{layers}l-{format}"
        # Fewer routed experts or a smaller vocabulary (real widths otherwise): a slice
        # whose memory figures are the full one's (an expert at a time, the vocabulary
        # copied) on a disk that cannot hold 15 GB a layer and its bf16 merge.
        if experts is not None:
            shape = replace(shape, experts=experts)
            name = f"{shape_name}-{layers}l-{experts}e-{format}"
        if vocab is not None:
            shape = replace(shape, vocab=vocab)
            name = f"{name.rsplit('-', 1)[0]}-v{vocab}-{format}"
    elif experts is not None or vocab is not None:
        raise SystemExit("--experts and --vocab are for the DeepSeek shapes")
    elif layers is None or layers == shape.layers:
        layers = shape.layers
        name = f"{shape_name}-{format}"
    else:
        # gpt-oss with fewer layers than released (real widths): for a disk that cannot
        # hold the whole model and its bf16 merge (13.8 + 41.8 GB).
        shape = replace(shape, layers=layers)
        name = f"{shape_name}-{layers}l-{format}"
    base = workdir / name
    adapter = workdir / (name.rsplit("-", 1)[0] + f"-adapter-r{rank}")
    if isinstance(shape, DeepSeekShape):
        specs, config = (
            deepseek_specs(shape, layers, quantized),
            deepseek_config(shape, layers, quantized),
        )
    else:
        if format == "fp8":
            raise SystemExit("gpt-oss ships MXFP4: --format mxfp4 or bf16")
        specs, config = gpt_oss_specs(shape, quantized), gpt_oss_config(shape, quantized)
    if not (base / "config.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        total = write_shards(base, specs, seed, shard_size)
        (base / "config.json").write_text(json.dumps(config, indent=2))
    total = sum(s.nbytes for s in specs)
    if not (adapter / "adapter_config.json").is_file():
        adapter.mkdir(parents=True, exist_ok=True)
        factors = adapter_specs(shape, layers, rank)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in factors:
            header[spec.name] = {
                "dtype": "F32",
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with (adapter / "adapter_model.safetensors").open("wb") as file:
            file.write(len(encoded).to_bytes(8, "little") + encoded)
            for spec in factors:
                generator = torch.Generator().manual_seed(tensor_seed(seed + 1, spec.name))
                file.write(
                    torch.randn(spec.shape, generator=generator).mul_(LORA_STD).numpy().tobytes()
                )
        peft = adapter_config(rank=rank, lora_alpha=2 * rank)
        if isinstance(shape, DeepSeekShape):
            peft["target_modules"] = [
                "q_a_proj",
                "q_b_proj",
                "kv_a_proj_with_mqa",
                "kv_b_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        else:
            peft["target_modules"] = ["q_proj", "v_proj"]
            peft["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        (adapter / "adapter_config.json").write_text(json.dumps(peft, indent=2))
    return {"base": str(base), "adapter": str(adapter), "bytes": total}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="layers: DeepSeek's MoE layers in the slice (default 3); gpt-oss (default all 24)",
    )
    parser.add_argument("--format", choices=["fp8", "mxfp4", "bf16"], required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=5 * 10**9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--experts", type=int, default=None, help="DeepSeek: routed experts a layer (default 256)"
    )
    parser.add_argument(
        "--vocab", type=int, default=None, help="DeepSeek: vocabulary (default 129280)"
    )
    args = parser.parse_args(argv)
    built = build(
        args.shape,
        args.layers,
        args.format,
        args.workdir,
        args.rank,
        args.shard_size,
        args.seed,
        args.experts,
        args.vocab,
    )
    print(json.dumps(built))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
