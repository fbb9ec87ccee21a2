"""``--save-method lora``: write the adapter alone, normalized, instead of a merged model.

The output is what PEFT's ``save_pretrained`` writes: ``adapter_config.json``
(copied as is) and ``adapter_model.safetensors`` with every adapter tensor under
its PEFT key, whatever the input's format (a pickled ``adapter_model.bin`` comes
out as safetensors). It is written only after the adapter was checked against
BASE (the plan was built), so OUT is an adapter known to fit that base.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_merge.inputs.resolve import ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME, AdapterFolder
from lora_merge.io.reader import TensorSource
from lora_merge.io.shard_writer import ShardWriter, TensorSpec


def write_normalized_adapter(
    folder: Path, adapter_folder: AdapterFolder, adapter: TensorSource
) -> int:
    """Write the adapter's config and tensors into ``folder``; return the tensor bytes written."""
    specs = [
        TensorSpec(name=key, dtype=adapter.dtype(key), shape=adapter.shape(key))
        for key in sorted(adapter.keys())
    ]
    written = 0
    with ShardWriter(folder / ADAPTER_SAFETENSORS_NAME, specs) as writer:
        for spec in specs:
            written += writer.tensor(spec.name).write(adapter.read_rows(spec.name))
    # --save-method lora is refused for config-less (loralib) files before any writing.
    assert adapter_folder.config_path is not None
    shutil.copyfile(adapter_folder.config_path, folder / ADAPTER_CONFIG_NAME)
    return written
