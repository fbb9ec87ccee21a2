"""The files around the shards: index, config.json, tokenizer and generation files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from lora_merge.dtypes import BF16, F16, F32, DType
from lora_merge.io.hub_names import CONFIG_NAME, SAFETENSORS_INDEX_FILE
from lora_merge.io.shard_writer import TensorSpec

# Files a merged model needs besides weights. The tokenizer files travel as a
# set: if the adapter folder has any of them (an adapter trained with added
# tokens ships its tokenizer), all come from the adapter, so that a stale base
# file (an old special_tokens_map.json, say) never sits beside the adapter's
# tokenizer. Other files are taken from the adapter if it has them, else from
# the base. Adapter weights, pickles and training state are never copied.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
OTHER_SIDE_FILE_NAMES = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)

DTYPE_NAME_IN_CONFIG = {BF16: "bfloat16", F16: "float16", F32: "float32"}


def write_index(folder: Path, shards: Sequence[tuple[str, Sequence[TensorSpec]]]) -> None:
    """Write ``model.safetensors.index.json``: total data bytes and each key's shard."""
    weight_map = {spec.name: file_name for file_name, specs in shards for spec in specs}
    total_size = sum(spec.nbytes for _, specs in shards for spec in specs)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / SAFETENSORS_INDEX_FILE, index)


def write_config(
    folder: Path,
    base_config: dict[str, object],
    output_dtype: DType | None,
    vocab_size: int | None,
    updates: Mapping[str, object] | None = None,
) -> None:
    """Write config.json: the base's, with the dtype and vocabulary size of the output.

    ``updates`` are other fields the merged tensors need (see ``MergePlan.config_updates``).

    transformers ≥ 4.56 writes ``dtype``; older versions read ``torch_dtype``. We set
    ``dtype`` and update ``torch_dtype`` where the base has it.
    """
    if not base_config:
        return
    config = dict(base_config)
    if output_dtype is not None:
        name = DTYPE_NAME_IN_CONFIG[output_dtype]
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    config.update(updates or {})
    _write_json(folder / CONFIG_NAME, config)


def merged_model_config(
    base_config: dict[str, object],
    base_quantized: bool,
    quantization_config: dict[str, object] | None = None,
) -> dict[str, object]:
    """The config.json fields OUT starts from, before :func:`write_config`'s updates.

    Args:
        base_config: BASE's config.json.
        base_quantized: whether BASE holds bitsandbytes-quantized weights.
        quantization_config: OUT's own ``quantization_config`` (``--save-method
            merged_4bit``), or None when OUT holds plain tensors.
    """
    if quantization_config is None and not base_quantized:
        return base_config
    # A plain output of a quantized base drops BASE's quantization_config:
    # transformers must not look for quant states that are not there.
    config = {k: v for k, v in base_config.items() if k != "quantization_config"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def copy_side_files(folder: Path, base: Path, adapter: Path) -> list[str]:
    """Copy tokenizer and generation files into ``folder``; return their names.

    The tokenizer set comes whole from the adapter when it has any tokenizer
    file, else from the base; other files individually, the adapter's first.
    """
    tokenizer_source = base
    if any((adapter / name).is_file() for name in TOKENIZER_FILE_NAMES):
        tokenizer_source = adapter
    sources: list[tuple[str, tuple[Path, ...]]] = [
        (name, (tokenizer_source,)) for name in TOKENIZER_FILE_NAMES
    ]
    sources += [(name, (adapter, base)) for name in OTHER_SIDE_FILE_NAMES]
    copied = []
    for name, folders in sources:
        for source_folder in folders:
            if (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, folder / name)
                copied.append(name)
                break
    return copied


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
