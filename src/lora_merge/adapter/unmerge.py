"""What ``--unmerge`` can undo, decided from the adapter alone.

Unmerging subtracts ``scale * B @ A`` from a merged model (what loralib's
``train()`` does to a merged layer). That inverts a plain LoRA merge up to
rounding, but not DoRA: PEFT's DoRA merge multiplies ``W + scale * B @ A`` by
``m / ||W + scale * B @ A||``, a norm of the *original* W, which a merged model
no longer holds; dividing by the norm of the merged weight would give another
model. So a DoRA adapter is refused up front, by its config or its keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from lora_merge.errors import InvalidInputError
from lora_merge.io.json_files import read_json_object

DORA_KEY_MARKER = ".lora_magnitude_vector"


def refuse_unmerge_of_dora(config_path: Path | None, keys: Iterable[str]) -> None:
    """Raise when the adapter is DoRA (``use_dora`` in its config or magnitude vectors in its file).

    Args:
        config_path: the adapter_config.json, or None for a config-less (loralib) file.
        keys: the adapter file's tensor names.

    Raises:
        InvalidInputError: the adapter is DoRA, so the merge cannot be undone exactly.
    """
    magnitude_key = next((key for key in keys if DORA_KEY_MARKER in key), None)
    use_dora = False
    if config_path is not None:
        # A config that cannot be read is reported by read_adapter_config, in its own words.
        with suppress(InvalidInputError):
            use_dora = bool(read_json_object(config_path).get("use_dora"))
    if use_dora or magnitude_key is not None:
        where = f"{config_path} has use_dora=true" if use_dora else f"key {magnitude_key!r}"
        raise InvalidInputError(
            f"--unmerge cannot undo a DoRA adapter ({where}): DoRA rescales each weight by the "
            "norm of the original weight, which the merged model no longer holds; keep the "
            "base model and merge again instead"
        )
