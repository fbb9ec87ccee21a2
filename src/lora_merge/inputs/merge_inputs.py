"""Every input of one merge at once: BASE, each ADAPTER (local or from the Hub), and OUT.

OUT is checked last, against the resolved inputs, so that it can neither lie
inside one nor contain one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_merge.inputs.locations import existing_local_path
from lora_merge.inputs.resolve import (
    AdapterFolder,
    BaseCheckpoint,
    check_output_location,
    resolve_adapter,
    resolve_adapter_file,
    resolve_base,
)


def resolve_merge_inputs(
    base: str | Path,
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    loralib_file: bool,
    overwrite: bool,
    quiet: bool,
    ranged_base: bool = False,
) -> tuple[BaseCheckpoint, list[AdapterFolder], Path]:
    """Find BASE and the adapters, downloading Hub repos, and check where OUT goes.

    A local folder wins; otherwise BASE / ADAPTER may be Hub repo ids
    (``org/name[@revision]``, see :func:`~lora_merge.inputs.hub.resolve_model_location`).

    Args:
        base: BASE as given.
        adapters: each ADAPTER as given.
        out: OUT as given.
        loralib_file: the adapter is one loralib state dict file (``--rank``/``--alpha``):
            local, with no config.
        overwrite: whether a non-empty OUT may be replaced.
        quiet: hide huggingface_hub's download bars.
        ranged_base: a Hub BASE's shards are not downloaded but read by range requests
            (``--low-disk``; see :mod:`lora_merge.inputs.hub_ranged`).

    Returns:
        The base, the adapter folders in the order given, and OUT as an absolute path.

    Raises:
        LoraMergeError: an input that is missing, unreadable or malformed, or an OUT
            that may not be written.
    """
    if ranged_base:
        from lora_merge.inputs.hub_ranged import resolve_ranged_base  # imports huggingface_hub

        base_checkpoint = resolve_ranged_base(base, quiet=quiet)
    else:
        base_folder = local_or_hub_folder(base, "BASE", kind="model", quiet=quiet)
        base_checkpoint = resolve_base(base_folder)
    if loralib_file:
        adapter_folders = [resolve_adapter_file(adapters[0])]
    else:
        adapter_folders = []
        for spec in adapters:  # each found, then checked, in the order given
            folder = local_or_hub_folder(spec, "ADAPTER", kind="adapter", quiet=quiet)
            adapter_folders.append(resolve_adapter(folder))
    # A loralib file's folder may hold OUT; only the file itself must stay out of OUT's way.
    inputs = [base_checkpoint.folder, *(folder.location for folder in adapter_folders)]
    return base_checkpoint, adapter_folders, check_output_location(out, inputs, overwrite)


def local_or_hub_folder(spec: str | Path, role: str, *, kind: str, quiet: bool) -> Path:
    """The local path ``spec`` names, or its Hub snapshot folder (downloaded if needed).

    See :func:`lora_merge.inputs.hub.resolve_model_location` for Hub repo ids.

    Raises:
        InputNotFoundError: ``spec`` is neither an existing path nor a Hub repo that
            can be resolved.
    """
    local = existing_local_path(spec)
    if local is not None:
        return local
    # Imported here, not at the top: only a Hub id needs huggingface_hub (about 0.3 s).
    from lora_merge.inputs.hub import resolve_model_location

    return resolve_model_location(spec, role, kind=kind, quiet=quiet)
