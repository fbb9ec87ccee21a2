"""Where a 16-bit base records how QLoRA training quantized it (``--qlora-base``).

transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...)`` is saved as
config.json's ``quantization_config``; some repos ship 16-bit weights with it so
that ``from_pretrained`` quantizes on load, and a QLoRA run from such a repo, or
from a prequantized folder the adapter names in ``base_model_name_or_path``,
trained on that format. PEFT's adapter_config.json records none. Only local
files are read: a Hub repo named by the adapter is not downloaded for this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_merge.errors import InvalidInputError
from lora_merge.io.hub_names import CONFIG_NAME
from lora_merge.io.json_files import read_json_object

# BitsAndBytesConfig's defaults, for the fields a saved config leaves out.
_DEFAULT_QUANT_TYPE = "fp4"


@dataclass(frozen=True)
class RecordedFormat:
    """A 4-bit format some config records, and which config.

    Attributes:
        quant_type: ``bnb_4bit_quant_type``.
        double_quant: ``bnb_4bit_use_double_quant``.
        where: the file it was read from, for messages and the model card.
    """

    quant_type: str
    double_quant: bool
    where: str


def recorded_4bit_format(
    base_config: Mapping[str, object], base_folder: Path, adapter_base: str | None
) -> RecordedFormat | None:
    """The 4-bit format BASE's config.json, or the adapter's local base folder's, records.

    Args:
        base_config: BASE's config.json.
        base_folder: BASE's folder (named in messages).
        adapter_base: the adapter's ``base_model_name_or_path``; read only when it
            is a local folder.
    """
    found = _format_of(base_config, str(base_folder / CONFIG_NAME))
    if found is None and adapter_base and (Path(adapter_base) / CONFIG_NAME).is_file():
        path = Path(adapter_base) / CONFIG_NAME
        found = _format_of(read_json_object(path), str(path))
    return found


def training_format(
    quant_type: str, double_quant: bool, recorded: RecordedFormat | None
) -> tuple[str, bool]:
    """The format ``--qlora-base`` quantizes with: the options', or what a config records.

    ``--quant-type nf4`` without ``--double-quant`` (the defaults) gives way to a
    recorded format; other values must agree with it.

    Raises:
        InvalidInputError: the options and the recorded format disagree.
    """
    if recorded is None or (recorded.quant_type, recorded.double_quant) == (
        quant_type,
        double_quant,
    ):
        return quant_type, double_quant
    if (quant_type, double_quant) == ("nf4", False):
        return recorded.quant_type, recorded.double_quant
    raise InvalidInputError(
        f"--qlora-base: {recorded.where} records the 4-bit format {recorded.quant_type}"
        f"{' with' if recorded.double_quant else ' without'} double quant, but the options ask "
        f"for {quant_type}{' with' if double_quant else ' without'}: leave --quant-type and "
        "--double-quant out to use the recorded one, or fix the config"
    )


def _format_of(config: Mapping[str, object], where: str) -> RecordedFormat | None:
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "bitsandbytes":
        return None
    if not (quantization.get("load_in_4bit") or quantization.get("_load_in_4bit")):
        return None
    quant_type = str(quantization.get("bnb_4bit_quant_type") or _DEFAULT_QUANT_TYPE)
    return RecordedFormat(quant_type, bool(quantization.get("bnb_4bit_use_double_quant")), where)
