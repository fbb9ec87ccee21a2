"""Where BASE or ADAPTER lives, decided without huggingface_hub where it is not needed.

A local folder always wins, and a merge of local folders never imports
huggingface_hub (about 0.3 s with its HTTP stack): :mod:`lora_merge.inputs.hub`,
which does, is imported only for an input that is not a local path.
"""

from __future__ import annotations

from pathlib import Path


def existing_local_path(spec: str | Path) -> Path | None:
    """``spec`` as a path (``~`` expanded) if something exists there, else None."""
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # "~someone/..." for a user that does not exist: not a local path
        return None
    return path if path.exists() else None


def hub_snapshot_of(folder: Path) -> tuple[str, str] | None:
    """The repo id and commit of a folder that is a snapshot in huggingface_hub's cache.

    The cache layout is ``.../models--org--name/snapshots/<commit>/``; any other
    folder gives None.
    """
    repo_folder = folder.parent.parent
    if folder.parent.name != "snapshots" or not repo_folder.name.startswith("models--"):
        return None
    return repo_folder.name.removeprefix("models--").replace("--", "/"), folder.name
