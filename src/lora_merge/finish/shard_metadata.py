"""What every output shard's header records of the merge. Torch-free.

The ``__metadata__`` of each shard: the format plus a few ``lora_merge.*`` keys
(the model card, :mod:`lora_merge.finish.provenance`, says the same at length).
It is part of the header, so it decides where each tensor's bytes start: the
copies started before ``import torch`` (:mod:`lora_merge.run.copy_ahead`) build
it here from the same inputs as the run does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_merge._version import __version__
from lora_merge.inputs.locations import hub_snapshot_of
from lora_merge.io.safetensors_header import OUTPUT_METADATA


@dataclass(frozen=True)
class InputIdentity:
    """One input of the merge (BASE or ADAPTER) as the user named it.

    Attributes:
        role: ``"base"`` or ``"adapter"``.
        spec: what was given: a path, or ``org/name[@revision]``.
        folder: the local folder read.
        repo_id / commit: the Hub repo and the commit the folder is a snapshot of, if any.
    """

    role: str
    spec: str
    folder: Path
    repo_id: str | None = None
    commit: str | None = None

    @classmethod
    def of(cls, role: str, spec: str, folder: Path) -> InputIdentity:
        snapshot = hub_snapshot_of(folder)
        repo_id, commit = snapshot if snapshot is not None else (None, None)
        return cls(role=role, spec=spec, folder=folder, repo_id=repo_id, commit=commit)

    @property
    def label(self) -> str:
        """``org/name@commit`` for a Hub snapshot, else the path as given."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else self.spec


def shard_metadata_of(
    base: InputIdentity, adapter: InputIdentity, method: str, version: str = __version__
) -> dict[str, str]:
    """The ``__metadata__`` of every output shard: the format plus a few provenance keys.

    Args:
        base / adapter: the inputs (the first adapter, when several are combined).
        method: the arithmetic, one line (the model card's).
        version: the lora-merge that merged.
    """
    return {
        **OUTPUT_METADATA,
        "lora_merge.version": version,
        "lora_merge.base": base.label,
        "lora_merge.adapter": adapter.label,
        "lora_merge.method": method,
    }
