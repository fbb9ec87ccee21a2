"""Does the adapter say it was trained on this BASE? A warning when it names another model.

adapter_config.json records ``base_model_name_or_path`` (a Hub id or the path
used at training time). Shapes decide whether a merge is possible; names only
tell whether it is likely the intended one, so a difference is a warning,
never an error, and never silent.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lora_merge.inputs.locations import hub_snapshot_of


def base_mismatch_warning(
    adapter_base: str | None, base_spec: str, base_folder: Path, base_config: dict[str, object]
) -> str | None:
    """A warning when the adapter names a base that BASE does not appear to be; else None.

    BASE's names are: what the user typed, its folder, and ``_name_or_path`` from
    its config.json. Two names agree when their last path components match,
    ignoring case (``meta-llama/Llama-2-7b-hf`` and ``./Llama-2-7b-hf`` agree).
    A Hub cache snapshot folder is named by the repo it belongs to.
    """
    if not adapter_base:
        return None
    names = {base_spec, str(base_folder), str(base_config.get("_name_or_path") or "")}
    snapshot = hub_snapshot_of(base_folder)
    if snapshot is not None:
        names.add(snapshot[0])
    if _last_component(adapter_base) in {_last_component(name) for name in names if name}:
        return None
    return (
        f"the adapter was trained on {adapter_base!r} (base_model_name_or_path in "
        f"adapter_config.json) but BASE is {base_spec!r}; the shapes fit, so merging anyway: "
        "check that this is the base you mean"
    )


def base_mismatch_warnings(
    adapter_bases: Iterable[str | None],
    base_spec: str,
    base_folder: Path,
    base_config: dict[str, object],
) -> list[str]:
    """One warning per adapter that names another base (see :func:`base_mismatch_warning`)."""
    notes = (
        base_mismatch_warning(adapter_base, base_spec, base_folder, base_config)
        for adapter_base in adapter_bases
    )
    return [note for note in notes if note]


def _last_component(name: str) -> str:
    return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].split("@", 1)[0].lower()
