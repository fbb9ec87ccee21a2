"""Small JSON documents read from model folders: configs, indexes, journals, quant states.

Every one of them comes from a download or a disk we do not control, so the
reader turns each way ``json.loads`` can fail into one
:class:`~lora_merge.errors.InvalidInputError` that names the file: besides
``JSONDecodeError``, an integer of more than 4300 digits raises ``ValueError``
and deep nesting raises ``RecursionError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_merge.errors import InvalidInputError


def read_json_object(path: Path, what: str | None = None) -> dict[str, Any]:
    """Read a UTF-8 file that holds one JSON object.

    Args:
        path: the file.
        what: how messages name the document; the path when None.

    Returns:
        The object, as ``json.loads`` builds it (its values are whatever the file holds:
        check each before use).

    Raises:
        InvalidInputError: the file cannot be read, is not UTF-8, is not valid
            JSON or holds another JSON value than an object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read {path}: {err}") from err
    return parse_json_object(text, str(path) if what is None else what)


def parse_json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """Parse one JSON object; bytes must be UTF-8 (JSON's only encoding between systems).

    Args:
        text: the document.
        what: how messages name it, e.g. its path.

    Raises:
        InvalidInputError: not UTF-8, not valid JSON, or not an object.
    """
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"{what} is not UTF-8 text ({err})") from err
    except RecursionError as err:
        raise InvalidInputError(f"{what} is not valid JSON (nested too deeply)") from err
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        raise InvalidInputError(f"{what} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} is not a JSON object")
    return value


def is_count(value: object) -> bool:
    """Whether a JSON value is a size or an offset: an integer >= 0 (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
