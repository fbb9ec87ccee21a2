"""A Hugging Face cache on disk, laid out as huggingface_hub writes it, for offline Hub-id tests.

``hub/models--org--name`` with ``blobs/``, ``snapshots/<commit>/`` links into them,
``refs/<branch or tag>``, and optionally the ``trees/<commit>.json`` listing: huggingface_hub's
own ``snapshot_download`` reads it with HF_HUB_OFFLINE=1, so nothing is mocked and nothing
reaches the network. The ``hub_cache`` fixture (conftest.py) builds one with
:func:`build_hub_cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from handmade_checkpoints import write_adapter, write_base
from huggingface_hub import constants

BASE_REPO = "org/base-model"
ADAPTER_REPO = "org/adapter"

# Environment variables that would point huggingface_hub somewhere other than HF_HOME.
CACHE_OVERRIDES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")


def commit_hash(label: str) -> str:
    """A 40-hex-digit commit id, as the Hub uses."""
    return hashlib.sha1(label.encode()).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    """Top-level file name -> content."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def cache_repo(
    cache: Path,
    repo_id: str,
    commits: dict[str, dict[str, bytes]],
    refs: dict[str, str],
    listings: dict[str, list[str]] | None = None,
) -> Path:
    """Write one repo into a hub cache as huggingface_hub lays it out; return its folder.

    Args:
        cache: the hub cache (``$HF_HOME/hub``).
        repo_id: ``org/name``.
        commits: commit hash -> file name -> content of that commit's snapshot.
        refs: branch or tag -> commit hash (written without a newline, as huggingface_hub does).
        listings: commit hash -> every file of the repo at that commit, written as the
            ``trees/<commit>.json`` listing huggingface_hub >= 1.x keeps next to snapshots.
    """
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, files in commits.items():
        snapshot = storage / "snapshots" / commit
        for name, data in files.items():
            blob_id = hashlib.sha256(data).hexdigest()
            blob = storage / "blobs" / blob_id
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        ref_path = storage / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(commit)
    for commit, names in (listings or {}).items():
        files = {name: {"size": 1, "blob_id": commit_hash(name)} for name in names}
        trees = storage / "trees"
        trees.mkdir(parents=True, exist_ok=True)
        (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return storage


@dataclass(frozen=True)
class HubCache:
    """A temporary HF_HOME holding a base repo (two commits) and an adapter repo."""

    home: Path
    base_storage: Path
    adapter_storage: Path
    main: str  # the base's refs/main
    v1: str  # the base's refs/v1, an older commit
    adapter_main: str
    base_files: dict[str, bytes]  # the main commit's files

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def snapshot(self, storage: Path, commit: str) -> Path:
        return storage / "snapshots" / commit

    def env(self) -> dict[str, str]:
        """The environment of a user whose cache this is, working offline."""
        env = {key: value for key, value in os.environ.items() if key not in CACHE_OVERRIDES}
        env.update(HF_HOME=str(self.home), HF_HUB_OFFLINE="1")
        return env


def build_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    """Build the cache under ``tmp_path`` and point huggingface_hub at it, offline, in this process too.

    huggingface_hub reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE into
    ``huggingface_hub.constants`` when it is imported, which happened long before this
    fixture runs; the in-process tests therefore also set those constants, and the
    subprocess tests check that the environment alone is enough.
    """
    home = tmp_path / "hf-home"
    cache = home / "hub"
    source = tmp_path / "source"
    write_base(source / "base-v1", shards=1, seed=1)
    write_base(source / "base-main", shards=2)
    write_adapter(source / "adapter")
    main, v1, adapter_main = commit_hash("main"), commit_hash("v1"), commit_hash("adapter")
    base_files = folder_files(source / "base-main")
    base_storage = cache_repo(
        cache,
        BASE_REPO,
        {main: base_files, v1: folder_files(source / "base-v1")},
        {"main": main, "v1": v1},
    )
    adapter_storage = cache_repo(
        cache,
        ADAPTER_REPO,
        {adapter_main: folder_files(source / "adapter")},
        {"main": adapter_main},
    )
    for name in CACHE_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return HubCache(home, base_storage, adapter_storage, main, v1, adapter_main, base_files)
