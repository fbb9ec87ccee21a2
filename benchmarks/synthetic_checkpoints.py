"""Synthetic Llama checkpoints and PEFT LoRA adapters for the merge benchmark.

Builds, without ever instantiating a model in transformers:

* a random bf16 Llama base model laid out exactly as
  ``LlamaForCausalLM.save_pretrained`` lays it out (``config.json``,
  ``model-0000i-of-0000n.safetensors`` shards and
  ``model.safetensors.index.json``), and
* a PEFT-format LoRA adapter folder for it (``adapter_config.json`` with the
  fields PEFT 0.21 writes, ``adapter_model.safetensors`` with fp32
  ``lora_A`` / ``lora_B`` tensors for the q, k, v, o, gate, up and down
  projections of every layer).

Safetensors files are written by a streaming writer: the header is computed
from the tensor shapes up front, then every tensor is generated in chunks of
at most ``GENERATION_CHUNK_ELEMENTS`` values and appended to the file, so the
peak memory of a build is a few tens of MB whatever the model size.

Every tensor is drawn from its own ``torch.Generator`` seeded from the build
seed and the tensor name, so the content does not depend on shard layout or
build order, and rebuilding with the same seed gives identical bytes.

Built folders are cached: a folder is built under ``<name>.partial`` and
renamed into place when complete, and a ``<name>.manifest.json`` sidecar
(kept *outside* the folder so ``cp -r`` and the mergers never see it)
records what was built. A folder whose manifest matches the request is
reused as is.

Usage as a script (the benchmark calls it this way, in a subprocess, so the
benchmark process itself never imports torch)::

    .venv/bin/python benchmarks/synthetic_checkpoints.py --shape 1b \\
        --workdir .bench/bench_merge

It prints one JSON line on stdout: ``{"base": PATH, "adapter": PATH}``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_merge.io.safetensors_header import HeaderTensor, encode_header

if TYPE_CHECKING:
    import torch

#: Bump when the generated content or layout changes, to invalidate caches.
GENERATOR_VERSION = 1

#: Largest number of values generated at once while writing a tensor.
GENERATION_CHUNK_ELEMENTS = 4 * 1024 * 1024

BASE_WEIGHT_STD = 0.02
LORA_WEIGHT_STD = 0.01
LORA_RANK = 16
LORA_ALPHA = 32
NUMBER_OF_BASE_SHARDS = 3

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_MODULES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Adapter variants: which projections of every layer carry LoRA. "q-v" is the
# original LoRA paper's (and many tutorials') choice: most bytes stay untouched.
LORA_TARGETS = {"all-linear": LORA_TARGET_MODULES, "q-v": ("q_proj", "v_proj")}

#: Bytes per value of the safetensors dtypes used here.
SAFETENSORS_DTYPE_SIZES: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4}

#: Names of the matching ``torch`` dtypes (torch is imported lazily).
TORCH_DTYPE_NAMES: dict[str, str] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class LlamaShape:
    """Architecture hyper-parameters of a Llama model.

    Attributes:
        name: Short name used on the command line and in folder names.
        description: Which public model the shape copies.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the MLP.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention).
        vocab_size: Vocabulary size (rows of the embedding and ``lm_head``).
        rms_norm_eps: Epsilon of the RMS norms (config only).
        max_position_embeddings: Context length (config only).
    """

    name: str
    description: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def key_value_size(self) -> int:
        """Output width of ``k_proj`` and ``v_proj``."""
        return self.num_key_value_heads * self.head_dim


SHAPES: dict[str, LlamaShape] = {
    shape.name: shape
    for shape in (
        LlamaShape(
            name="tiny",
            description="tiny smoke-test",
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1000,
            rms_norm_eps=1e-5,
            max_position_embeddings=2048,
        ),
        LlamaShape(
            name="1b",
            description="TinyLlama-1.1B",
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            rms_norm_eps=1e-5,
            max_position_embeddings=2048,
        ),
        LlamaShape(
            name="3b",
            description="OpenLLaMA-3B",
            hidden_size=3200,
            intermediate_size=8640,
            num_hidden_layers=26,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            rms_norm_eps=1e-6,
            max_position_embeddings=2048,
        ),
        LlamaShape(
            name="7b",
            description="Llama-2-7B",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
    )
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to generate.

    Attributes:
        name: Key in the safetensors file.
        shape: Tensor shape.
        dtype: Stored safetensors dtype name (``"BF16"``, ``"F32"``...).
        std: Standard deviation of the normal values; ``None`` means all ones.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    std: float | None

    @property
    def element_count(self) -> int:
        """Number of values in the tensor."""
        return math.prod(self.shape)

    @property
    def byte_size(self) -> int:
        """Number of bytes the tensor takes on disk."""
        return self.element_count * SAFETENSORS_DTYPE_SIZES[self.dtype]


def linear_shapes(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """Returns the ``(out_features, in_features)`` of each projection kind.

    Args:
        shape: The model shape.

    Returns:
        Mapping from projection name (``"q_proj"``, ...) to its weight shape.
    """
    hidden, intermediate, key_value = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.key_value_size,
    )
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (key_value, hidden),
        "v_proj": (key_value, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


def projection_module_path(layer_index: int, projection: str) -> str:
    """Returns the module path of a projection, as in ``LlamaForCausalLM``.

    Args:
        layer_index: Decoder layer index.
        projection: Projection name, e.g. ``"q_proj"`` or ``"down_proj"``.

    Returns:
        For example ``"model.layers.3.self_attn.q_proj"``.
    """
    block = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer_index}.{block}.{projection}"


def base_tensor_specs(shape: LlamaShape) -> list[TensorSpec]:
    """Lists the base model tensors in ``LlamaForCausalLM.state_dict()`` order.

    Args:
        shape: The model shape.

    Returns:
        Specs for the embedding, every layer's projections and norms, the
        final norm and the (untied) ``lm_head``.
    """
    bf16 = "BF16"
    projections = linear_shapes(shape)
    specs = [
        TensorSpec(
            "model.embed_tokens.weight",
            (shape.vocab_size, shape.hidden_size),
            bf16,
            BASE_WEIGHT_STD,
        )
    ]
    for layer_index in range(shape.num_hidden_layers):
        for projection in LORA_TARGET_MODULES:
            name = f"{projection_module_path(layer_index, projection)}.weight"
            specs.append(TensorSpec(name, projections[projection], bf16, BASE_WEIGHT_STD))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs.append(
                TensorSpec(
                    f"model.layers.{layer_index}.{norm}.weight", (shape.hidden_size,), bf16, None
                )
            )
    specs.append(TensorSpec("model.norm.weight", (shape.hidden_size,), bf16, None))
    specs.append(
        TensorSpec("lm_head.weight", (shape.vocab_size, shape.hidden_size), bf16, BASE_WEIGHT_STD)
    )
    return specs


def adapter_tensor_specs(
    shape: LlamaShape, rank: int = LORA_RANK, targets: str = "all-linear"
) -> list[TensorSpec]:
    """Lists the LoRA tensors of an adapter on the target projections of all layers.

    Args:
        shape: The base model shape.
        rank: LoRA rank ``r``.
        targets: Key of ``LORA_TARGETS``.

    Returns:
        Specs named like PEFT names them
        (``base_model.model.<module>.lora_A.weight``), ``lora_A`` of shape
        ``(r, in_features)`` and ``lora_B`` of shape ``(out_features, r)``,
        both fp32.
    """
    projections = linear_shapes(shape)
    specs = []
    for layer_index in range(shape.num_hidden_layers):
        for projection in LORA_TARGETS[targets]:
            out_features, in_features = projections[projection]
            prefix = f"base_model.model.{projection_module_path(layer_index, projection)}"
            specs.append(
                TensorSpec(f"{prefix}.lora_A.weight", (rank, in_features), "F32", LORA_WEIGHT_STD)
            )
            specs.append(
                TensorSpec(f"{prefix}.lora_B.weight", (out_features, rank), "F32", LORA_WEIGHT_STD)
            )
    return specs


def tensor_seed(build_seed: int, tensor_name: str) -> int:
    """Derives a per-tensor generator seed from the build seed and the name.

    Args:
        build_seed: Seed of the whole build.
        tensor_name: Key of the tensor.

    Returns:
        A non-negative 63-bit seed.
    """
    return (build_seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**63)


def generate_tensor_chunks(spec: TensorSpec, build_seed: int) -> Iterator[torch.Tensor]:
    """Yields the values of a tensor, flattened, in bounded-size chunks.

    Args:
        spec: The tensor to generate.
        build_seed: Seed of the whole build.

    Yields:
        1-D contiguous tensors of ``spec.dtype`` whose concatenation is the
        row-major content of the tensor.
    """
    import torch

    dtype = getattr(torch, TORCH_DTYPE_NAMES[spec.dtype])
    remaining = spec.element_count
    if spec.std is None:
        while remaining:
            count = min(remaining, GENERATION_CHUNK_ELEMENTS)
            yield torch.ones(count, dtype=dtype)
            remaining -= count
        return
    generator = torch.Generator().manual_seed(tensor_seed(build_seed, spec.name))
    while remaining:
        count = min(remaining, GENERATION_CHUNK_ELEMENTS)
        values = torch.randn(count, generator=generator, dtype=torch.float32)
        values.mul_(spec.std)
        yield values.to(dtype)
        remaining -= count


def safetensors_header(specs: Sequence[TensorSpec]) -> bytes:
    """Builds a safetensors header for tensors stored in the given order.

    Args:
        specs: Tensors in the order their data will follow the header.

    Returns:
        The 8-byte little-endian header length followed by the JSON header,
        space-padded to a multiple of 8 bytes as the reference writer does
        (lora-merge's own shard writer encodes its headers the same way).
    """
    return encode_header(
        [HeaderTensor(spec.name, spec.dtype, tuple(spec.shape), spec.byte_size) for spec in specs]
    )


def write_safetensors_streaming(path: Path, specs: Sequence[TensorSpec], build_seed: int) -> None:
    """Writes a safetensors file tensor by tensor, chunk by chunk.

    Tensors are stored sorted by name, like ``safetensors.torch.save_file``
    stores same-dtype tensors.

    Args:
        path: File to create.
        specs: Tensors to write.
        build_seed: Seed of the whole build.
    """
    import torch

    ordered = sorted(specs, key=lambda spec: spec.name)
    with path.open("wb") as file:
        file.write(safetensors_header(ordered))
        for spec in ordered:
            for chunk in generate_tensor_chunks(spec, build_seed):
                file.write(chunk.view(torch.uint8).numpy().tobytes())


def split_into_shards(specs: Sequence[TensorSpec], shard_count: int) -> list[list[TensorSpec]]:
    """Splits tensors, in order, into contiguous shards of similar byte size.

    A tensor goes to the shard its byte midpoint falls into.

    Args:
        specs: Tensors in state-dict order.
        shard_count: Number of shards wanted.

    Returns:
        ``shard_count`` non-empty lists of specs.

    Raises:
        ValueError: If a shard would be empty.
    """
    total = sum(spec.byte_size for spec in specs)
    shards: list[list[TensorSpec]] = [[] for _ in range(shard_count)]
    offset = 0
    for spec in specs:
        midpoint = offset + spec.byte_size / 2
        shards[min(shard_count - 1, int(midpoint * shard_count / total))].append(spec)
        offset += spec.byte_size
    if not all(shards):
        raise ValueError(f"cannot split {len(specs)} tensors into {shard_count} non-empty shards")
    return shards


def write_llama_config(folder: Path, shape: LlamaShape) -> None:
    """Writes ``config.json`` with transformers' own ``LlamaConfig``.

    Args:
        folder: Model folder.
        shape: The model shape.
    """
    from transformers import LlamaConfig

    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        rms_norm_eps=shape.rms_norm_eps,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    config.save_pretrained(folder)


def adapter_config(
    rank: int = LORA_RANK, lora_alpha: int = LORA_ALPHA, targets: str = "all-linear"
) -> dict[str, object]:
    """Returns an ``adapter_config.json`` as PEFT 0.21.2 writes it.

    The field list was taken from ``get_peft_model(...).save_pretrained`` on a
    tiny Llama with ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
    target_modules=[all 7 projections], task_type="CAUSAL_LM")``.

    Args:
        rank: LoRA rank ``r``.
        lora_alpha: LoRA alpha (scaling is ``lora_alpha / r``).
        targets: Key of ``LORA_TARGETS``.

    Returns:
        The JSON-serialisable config.
    """
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(LORA_TARGETS[targets]),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def _manifest_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".manifest.json")


def _is_cached(folder: Path, manifest: dict[str, object]) -> bool:
    manifest_path = _manifest_path(folder)
    if not (folder.is_dir() and manifest_path.is_file()):
        return False
    try:
        return json.loads(manifest_path.read_text()) == manifest
    except json.JSONDecodeError:
        return False


def _fresh_partial_folder(folder: Path) -> Path:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _publish(partial: Path, folder: Path, manifest: dict[str, object]) -> None:
    _manifest_path(folder).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    _manifest_path(folder).write_text(json.dumps(manifest, indent=2) + "\n")


def folder_size_bytes(folder: Path) -> int:
    """Returns the total size of the regular files directly in a folder.

    Args:
        folder: Folder to measure.

    Returns:
        Sum of file sizes in bytes.
    """
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def build_base_model(folder: Path, shape: LlamaShape, build_seed: int, log: bool = True) -> Path:
    """Builds (or reuses) a random bf16 sharded Llama checkpoint.

    Args:
        folder: Where the model folder should be.
        shape: The model shape.
        build_seed: Seed of the random weights.
        log: Whether to print progress to stderr.

    Returns:
        ``folder``.
    """
    manifest = {
        "kind": "base",
        "generator_version": GENERATOR_VERSION,
        "seed": build_seed,
        "shard_count": NUMBER_OF_BASE_SHARDS,
        "shape": asdict(shape),
    }
    if _is_cached(folder, manifest):
        return folder
    started = time.perf_counter()
    partial = _fresh_partial_folder(folder)
    write_llama_config(partial, shape)
    specs = base_tensor_specs(shape)
    shards = split_into_shards(specs, NUMBER_OF_BASE_SHARDS)
    weight_map: dict[str, str] = {}
    for shard_index, shard_specs in enumerate(shards, start=1):
        file_name = f"model-{shard_index:05d}-of-{len(shards):05d}.safetensors"
        if log:
            print(
                f"  writing {folder.name}/{file_name} ({len(shard_specs)} tensors)",
                file=sys.stderr,
                flush=True,
            )
        write_safetensors_streaming(partial / file_name, shard_specs, build_seed)
        weight_map.update({spec.name: file_name for spec in shard_specs})
    index = {
        "metadata": {"total_size": sum(spec.byte_size for spec in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _publish(partial, folder, manifest)
    if log:
        elapsed = time.perf_counter() - started
        print(f"  built {folder} in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return folder


def build_lora_adapter(
    folder: Path, shape: LlamaShape, build_seed: int, log: bool = True, targets: str = "all-linear"
) -> Path:
    """Builds (or reuses) a PEFT LoRA adapter folder for a Llama shape.

    Args:
        folder: Where the adapter folder should be.
        shape: The base model shape.
        build_seed: Seed of the random LoRA weights.
        log: Whether to print progress to stderr.
        targets: Key of ``LORA_TARGETS``.

    Returns:
        ``folder``.
    """
    manifest = {
        "targets": targets,
        "kind": "lora_adapter",
        "generator_version": GENERATOR_VERSION,
        "seed": build_seed,
        "rank": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "shape": asdict(shape),
    }
    if _is_cached(folder, manifest):
        return folder
    partial = _fresh_partial_folder(folder)
    config_text = json.dumps(adapter_config(targets=targets), indent=2, sort_keys=True) + "\n"
    (partial / "adapter_config.json").write_text(config_text)
    write_safetensors_streaming(
        partial / "adapter_model.safetensors",
        adapter_tensor_specs(shape, targets=targets),
        build_seed,
    )
    _publish(partial, folder, manifest)
    if log:
        print(f"  built {folder}", file=sys.stderr, flush=True)
    return folder


def base_model_folder(workdir: Path, shape: LlamaShape, seed: int) -> Path:
    """Returns where the benchmark keeps the base model of a shape and seed.

    Args:
        workdir: Benchmark work folder.
        shape: The model shape.
        seed: Build seed.

    Returns:
        ``<workdir>/models/llama-<shape>-seed<seed>``.
    """
    return workdir / "models" / f"llama-{shape.name}-seed{seed}"


def adapter_folder(
    workdir: Path, shape: LlamaShape, seed: int, targets: str = "all-linear"
) -> Path:
    """Returns where the benchmark keeps the LoRA adapter of a shape and seed.

    Args:
        workdir: Benchmark work folder.
        shape: The model shape.
        seed: Build seed of the base model.
        targets: Key of ``LORA_TARGETS``.

    Returns:
        ``<workdir>/adapters/lora-r16-<targets>-llama-<shape>-seed<seed>``.
    """
    return workdir / "adapters" / f"lora-r{LORA_RANK}-{targets}-llama-{shape.name}-seed{seed}"


def build_benchmark_inputs(
    workdir: Path, shape: LlamaShape, seed: int, targets: str = "all-linear"
) -> tuple[Path, Path]:
    """Builds (or reuses) the base model and adapter for a benchmark run.

    Args:
        workdir: Benchmark work folder.
        shape: The model shape.
        seed: Build seed of the base model (the adapter uses ``seed + 1``).
        targets: Key of ``LORA_TARGETS``: which projections carry LoRA.

    Returns:
        ``(base_model_folder, adapter_folder)``.
    """
    base = build_base_model(base_model_folder(workdir, shape, seed), shape, seed)
    adapter = build_lora_adapter(
        adapter_folder(workdir, shape, seed, targets), shape, seed + 1, targets=targets
    )
    return base, adapter


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: builds inputs and prints their paths as JSON.

    Args:
        argv: Arguments, without the program name; ``None`` means ``sys.argv``.

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", choices=sorted(LORA_TARGETS), default="all-linear")
    args = parser.parse_args(argv)
    base, adapter = build_benchmark_inputs(
        args.workdir.resolve(), SHAPES[args.shape], args.seed, args.targets
    )
    print(json.dumps({"base": str(base), "adapter": str(adapter)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
