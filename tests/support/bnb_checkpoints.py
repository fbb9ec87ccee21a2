"""Write a bitsandbytes 4-bit checkpoint from a safetensors model folder, as transformers saves one.

transformers (``BitsAndBytesConfig(load_in_4bit=True)``, ``device_map="cpu"``,
``save_pretrained``) writes 4-bit checkpoints on a CPU-only machine with
bitsandbytes >= 0.46, but it has no blocksize option (always 64) and loads the
whole model. This module quantizes shard by shard with bitsandbytes'
``quantize_4bit`` directly, at any blocksize, and writes the same layout
(``QuantState.as_dict(packed=True)`` keys, ``quantization_config`` in
config.json); a test checks that it equals transformers' own output byte for
byte. Used by the tests and by the benchmark's NF4 case:

    python tests/support/bnb_checkpoints.py SRC DST --quant-type nf4 [--double-quant] [--blocksize 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# transformers quantizes every nn.Linear except the output embedding (lm_head):
# in a Llama-style checkpoint, the 2-D *_proj weights.
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm")


def is_quantized_by_transformers(name: str, tensor: torch.Tensor) -> bool:
    """True for the weights transformers' bitsandbytes integration quantizes in a Llama model."""
    return (
        name.endswith(".weight")
        and tensor.dim() == 2
        and not any(part in name for part in NOT_QUANTIZED)
    )


def quantization_config(
    quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> dict[str, object]:
    """config.json's quantization_config, as transformers 5 writes it for 4-bit."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quantize_4bit_tensors(
    name: str, weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int
) -> dict[str, torch.Tensor]:
    """The tensors transformers stores for one 4-bit weight, keyed as in its checkpoints."""
    # Imported here: test modules import this one whether or not bitsandbytes is installed
    # (their tests that need it are marked and skipped where it is missing).
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    tensors = {name: packed}
    for key, value in state.as_dict(packed=True).items():
        tensors[f"{name}.{key}"] = value
    return tensors


def save_bitsandbytes_4bit_checkpoint(
    source: Path,
    target: Path,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Quantize every Linear weight of the safetensors model in ``source`` into ``target``.

    One input shard is held at a time; the index, config.json (with
    ``quantization_config``) and the other JSON/tokenizer files come along.
    """
    target.mkdir(parents=True, exist_ok=True)
    shard_paths = sorted(source.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard in shard_paths:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = handle.get_tensor(key)
                if is_quantized_by_transformers(key, tensor):
                    tensors.update(
                        quantize_4bit_tensors(key, tensor, quant_type, double_quant, blocksize)
                    )
                else:
                    tensors[key] = tensor
        save_file(tensors, target / shard.name, metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = shard.name
            total_size += tensor.numel() * tensor.element_size()
    if len(shard_paths) > 1:
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for side_file in source.iterdir():
        if (
            side_file.is_file()
            and side_file.suffix != ".safetensors"
            and "index" not in side_file.name
        ):
            shutil.copyfile(side_file, target / side_file.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument(
        "--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16"
    )
    args = parser.parse_args()
    save_bitsandbytes_4bit_checkpoint(
        args.source,
        args.target,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
        compute_dtype=getattr(torch, args.compute_dtype),
    )


if __name__ == "__main__":
    main()
