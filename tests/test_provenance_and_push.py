"""OUT's model card and shard metadata, and --push-to-hub against a local Hub server.

The card is checked against independent oracles: huggingface_hub's own front
matter parser (``metadata_load``) and hashlib over the input files' bytes. The
push runs the installed command with HF_ENDPOINT pointed at ``fake_hub``, a
local HTTP server that speaks the Hub's upload API, so huggingface_hub's real
client code runs end to end without the network (its LFS path: the xet
protocol is switched off with HF_HUB_DISABLE_XET=1, see fake_hub.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, start_fake_hub
from handmade_checkpoints import write_adapter, write_base
from hub_cache import ADAPTER_REPO, BASE_REPO, HubCache
from hub_runs import push_env, run_cli
from huggingface_hub.repocard import metadata_load
from safetensors import safe_open

from lora_merge.errors import EXIT_PUSH_FAILED


@pytest.fixture
def local_inputs(tmp_path: Path) -> tuple[Path, Path]:
    # Named like the adapter's declared base, so no mismatch warning keeps it off the card.
    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    write_base(base, shards=2)
    write_adapter(adapter, base_model_name_or_path="org/base-model")
    return base, adapter


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    server, hub = start_fake_hub()
    yield hub
    server.shutdown()


def card_rows(out: Path) -> dict[str, list[str]]:
    """The model card's input-file table: file name -> [input, bytes, sha256 cell]."""
    rows = {}
    for line in (out / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = [cells[0], cells[2], cells[3].strip("`")]
    return rows


def shard_metadata(out: Path) -> list[dict[str, str]]:
    metadata = []
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            metadata.append(handle.metadata())
    return metadata


# ---------------------------------------------------------------------------------------------
# The model card and the shards' metadata
# ---------------------------------------------------------------------------------------------


def test_card_from_hub_inputs_names_repos_commits_and_file_hashes(
    hub_cache: HubCache,
    tmp_path: Path,
) -> None:
    """Repo ids in: the card's front matter names the base repo for the Hub's model tree, the
    body the commits, and every input file's sha256 equals hashlib over its bytes."""
    out = tmp_path / "merged"
    result = run_cli(BASE_REPO, ADAPTER_REPO, out, "-q", env=hub_cache.env())
    assert result.returncode == 0, result.stderr

    assert metadata_load(out / "README.md") == {
        "base_model": [BASE_REPO],
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "tags": ["lora-merge", "merged-lora"],
    }
    card = (out / "README.md").read_text()
    assert f"`{BASE_REPO}` at commit `{hub_cache.main}`" in card
    assert f"`{ADAPTER_REPO}` at commit `{hub_cache.adapter_main}`" in card
    assert f"lora-merge {BASE_REPO} {ADAPTER_REPO} OUT -q" in card
    rows = card_rows(out)
    snapshot = hub_cache.snapshot(hub_cache.base_storage, hub_cache.main)
    base_weights = sorted(p.name for p in snapshot.glob("*.safetensors"))
    assert len(base_weights) == 2
    for name in ["config.json", "model.safetensors.index.json", *base_weights]:
        data = (snapshot / name).read_bytes()
        assert rows[name] == ["base", str(len(data)), hashlib.sha256(data).hexdigest()], name
    adapter_snapshot = hub_cache.snapshot(hub_cache.adapter_storage, hub_cache.adapter_main)
    for name in ["adapter_config.json", "adapter_model.safetensors"]:
        data = (adapter_snapshot / name).read_bytes()
        assert rows[name] == ["adapter", str(len(data)), hashlib.sha256(data).hexdigest()], name
    for metadata in shard_metadata(out):
        assert metadata["lora_merge.base"] == f"{BASE_REPO}@{hub_cache.main}"
        assert metadata["lora_merge.adapter"] == f"{ADAPTER_REPO}@{hub_cache.adapter_main}"


def test_card_from_local_inputs_takes_the_adapters_declared_base(
    local_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Local folders: base_model is the adapter's base_model_name_or_path (a Hub id), hashes are
    computed from the files, and --no-hash-inputs leaves them out but keeps sizes."""
    base, adapter = local_inputs
    hashed, unhashed = tmp_path / "hashed", tmp_path / "unhashed"
    assert run_cli(base, adapter, hashed, "-q").returncode == 0
    assert run_cli(base, adapter, unhashed, "-q", "--no-hash-inputs").returncode == 0

    assert metadata_load(hashed / "README.md")["base_model"] == ["org/base-model"]
    hashed_rows, unhashed_rows = card_rows(hashed), card_rows(unhashed)
    inputs = [*sorted(base.glob("*.safetensors")), adapter / "adapter_model.safetensors"]
    for path in inputs:
        data = path.read_bytes()
        assert hashed_rows[path.name][1:] == [str(len(data)), hashlib.sha256(data).hexdigest()]
        assert unhashed_rows[path.name][1:] == [str(len(data)), "not computed (--no-hash-inputs)"]
    assert f"`{base}` (local folder)" in (hashed / "README.md").read_text()


def test_card_names_no_base_model_when_the_adapter_names_another_model(
    tmp_path: Path,
) -> None:
    """An adapter that names a different base gets a warning, and the card does not claim it."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_base(base, shards=1)
    write_adapter(adapter, base_model_name_or_path="someone/other-model")
    result = run_cli(base, adapter, tmp_path / "merged", "-q")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr
    assert "base_model" not in metadata_load(tmp_path / "merged" / "README.md")


# ---------------------------------------------------------------------------------------------
# --push-to-hub
# ---------------------------------------------------------------------------------------------


def test_push_uploads_out_to_a_new_private_repo_branch(
    local_inputs: tuple[Path, Path], tmp_path: Path, fake_hub: FakeHub
) -> None:
    """Every file of OUT arrives byte for byte on the asked branch of a new private repo
    (weights through Git LFS), authenticated with HF_TOKEN; the JSON summary has the commit."""
    base, adapter = local_inputs
    out = tmp_path / "merged"
    result = run_cli(
        base,
        adapter,
        out,
        "--push-to-hub",
        "me/merged-model",
        "--private",
        "--revision",
        "release",
        "--max-shard-size",
        "20KB",
        "--json",
        "-q",
        env=push_env(fake_hub, tmp_path / "hf-home"),
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # -q hides huggingface_hub's upload bars too
    repo = fake_hub.repos["me/merged-model"]
    assert repo.private is True
    local_files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([name for name in local_files if name.endswith(".safetensors")]) > 1
    assert repo.branches["release"] == local_files
    assert repo.branches["main"] == {}
    assert set(fake_hub.lfs_objects) == {
        hashlib.sha256(data).hexdigest()
        for name, data in local_files.items()
        if name.endswith(".safetensors")
    }
    assert fake_hub.unauthorized == []
    assert fake_hub.validated_cards  # the client had the Hub check the card's front matter
    assert all(card == metadata_load(out / "README.md") for card in fake_hub.validated_cards)
    summary = json.loads(result.stdout)
    assert summary["pushed_to"] == "me/merged-model"
    assert summary["commit_url"].startswith(f"{fake_hub.url}/me/merged-model/commit/")


def test_push_that_fails_keeps_out_and_exits_9(
    local_inputs: tuple[Path, Path], tmp_path: Path, fake_hub: FakeHub
) -> None:
    """A refused upload (a bad token here) is exit 9 with one line saying OUT is complete and how
    to upload it alone; OUT stays, whole."""
    base, adapter = local_inputs
    out = tmp_path / "merged"
    result = run_cli(
        base,
        adapter,
        out,
        "--push-to-hub",
        "me/merged-model",
        "-q",
        env=push_env(fake_hub, tmp_path / "hf-home", token="hf_wrong"),
    )

    assert result.returncode == EXIT_PUSH_FAILED
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "complete in" in lines[0] and "hf upload me/merged-model" in lines[0]
    assert fake_hub.unauthorized and not fake_hub.repos
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


def test_commit_refused_by_the_hub_is_exit_9(
    local_inputs: tuple[Path, Path], tmp_path: Path, fake_hub: FakeHub
) -> None:
    base, adapter = local_inputs
    fake_hub.refuse_commits_with = 403
    result = run_cli(
        base,
        adapter,
        tmp_path / "merged",
        "--push-to-hub",
        "me/merged-model",
        "-q",
        env=push_env(fake_hub, tmp_path / "hf-home"),
    )
    assert result.returncode == EXIT_PUSH_FAILED, result.stderr
    assert "me/merged-model" in result.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--push-to-hub", "not a repo id"], "is not a Hub repo id"),
        (["--private"], "only apply with --push-to-hub"),
        (["--revision", "dev"], "only apply with --push-to-hub"),
    ],
)
def test_push_options_are_checked_before_merging(
    local_inputs: tuple[Path, Path], tmp_path: Path, options: list[str], message: str
) -> None:
    """Mistakes in the push options are usage errors (exit 2) and nothing is merged."""
    base, adapter = local_inputs
    result = run_cli(base, adapter, tmp_path / "merged", *options)
    assert result.returncode == 2
    assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())
    assert not (tmp_path / "merged").exists()


def test_push_with_hf_hub_offline_is_refused_before_merging(
    local_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = local_inputs
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = run_cli(base, adapter, tmp_path / "merged", "--push-to-hub", "me/m", env=env)
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE" in result.stderr
    assert not (tmp_path / "merged").exists()
