"""BASE and ADAPTER as Hub repo ids, resolved offline against a real Hugging Face cache on disk.

Each test builds the cache layout huggingface_hub itself writes (``hub/models--org--name``
with ``blobs/``, ``snapshots/<commit>/`` links into them, ``refs/<branch or tag>``, and
optionally the ``trees/<commit>.json`` listing) and lets huggingface_hub's own
``snapshot_download`` read it with HF_HUB_OFFLINE=1: nothing is mocked and nothing
reaches the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from handmade_checkpoints import write_base
from hub_cache import ADAPTER_REPO, BASE_REPO, HubCache, cache_repo, commit_hash
from huggingface_hub.utils import LocalEntryNotFoundError, are_progress_bars_disabled
from merge_process import LORA_MERGE
from safetensors.torch import load_file

from lora_merge.errors import EXIT_INPUT_NOT_FOUND, InputNotFoundError
from lora_merge.inputs import hub
from lora_merge.inputs.hub import resolve_model_location
from lora_merge.inputs.resolve import resolve_adapter, resolve_base


def test_repo_id_resolves_to_the_snapshot_of_main(hub_cache: HubCache) -> None:
    folder = resolve_model_location(BASE_REPO, "BASE", kind="model")

    assert folder == hub_cache.snapshot(hub_cache.base_storage, hub_cache.main).resolve()
    # The existing checks accept the cache layout (snapshot links into ../../blobs).
    base = resolve_base(folder)
    assert {entry.path.name for entry in base.entries.values()} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }


def test_adapter_repo_id_resolves_and_passes_the_adapter_checks(hub_cache: HubCache) -> None:
    folder = resolve_model_location(ADAPTER_REPO, "ADAPTER", kind="adapter")

    assert folder == hub_cache.snapshot(hub_cache.adapter_storage, hub_cache.adapter_main).resolve()
    adapter = resolve_adapter(folder)
    assert adapter.weights_path.name == "adapter_model.safetensors"
    assert all(
        key.startswith("base_model.model.") and ".lora_" in key
        for key in load_file(adapter.weights_path)
    )


@pytest.mark.parametrize(
    ("revision", "expected"),
    [
        ("v1", "v1"),
        (commit_hash("v1"), "v1"),  # a full commit hash needs no ref
        (commit_hash("main"), "main"),
        ("main", "main"),
    ],
    ids=["tag", "commit-of-tag", "commit-of-main", "branch"],
)
def test_revision_after_at_sign_picks_that_snapshot(
    hub_cache: HubCache, revision: str, expected: str
) -> None:
    folder = resolve_model_location(f"{BASE_REPO}@{revision}", "BASE", kind="model")

    commit = {"v1": hub_cache.v1, "main": hub_cache.main}[expected]
    assert folder == hub_cache.snapshot(hub_cache.base_storage, commit).resolve()


def test_local_folder_wins_over_the_cached_repo_of_the_same_name(hub_cache: HubCache) -> None:
    local = Path(BASE_REPO)  # relative to the cwd, which the fixture made tmp_path
    write_base(local, shards=1, seed=7)

    folder = resolve_model_location(BASE_REPO, "BASE", kind="model")

    assert folder == local  # returned as given, not the snapshot
    assert (folder / "model.safetensors").is_file()
    # The same holds with a revision suffix when such a folder exists.
    (local.parent / "base-model@v1").mkdir()
    assert resolve_model_location(f"{BASE_REPO}@v1", "BASE", kind="model") == Path(
        f"{BASE_REPO}@v1"
    )


def test_repo_missing_from_the_cache_offline_says_so_and_how_to_fix_it(
    hub_cache: HubCache,
) -> None:
    with pytest.raises(InputNotFoundError) as caught:
        resolve_model_location("org/never-downloaded", "BASE", kind="model")

    message = str(caught.value)
    assert message.startswith("BASE org/never-downloaded is not a local folder")
    assert str(hub_cache.cache) in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "hf download org/never-downloaded" in message
    assert caught.value.exit_code == EXIT_INPUT_NOT_FOUND
    assert isinstance(caught.value.__cause__, LocalEntryNotFoundError)


@pytest.mark.parametrize(
    "revision",
    ["v2", commit_hash("v1")[:7], commit_hash("never")],
    ids=["unknown-tag", "short-hash", "uncached-commit"],
)
def test_revision_missing_from_the_cache_offline_is_not_found(
    hub_cache: HubCache, revision: str
) -> None:
    with pytest.raises(InputNotFoundError, match=f"at revision {revision} is not in the"):
        resolve_model_location(f"{BASE_REPO}@{revision}", "BASE", kind="model")


@pytest.mark.parametrize(
    "spec",
    [
        "a/b/c",
        "../x",
        "./x",
        "/no/such/folder",
        "x",
        "org/",
        "org/name@",
        "org/na me",
        "~nobody-x/y",
    ],
)
def test_spec_that_is_neither_a_path_nor_a_repo_id_is_not_found(
    hub_cache: HubCache, spec: str
) -> None:
    with pytest.raises(InputNotFoundError) as caught:
        resolve_model_location(spec, "ADAPTER", kind="adapter")

    assert str(caught.value) == (
        f"ADAPTER {spec} does not exist: it is neither a folder nor a Hugging Face Hub repo id "
        "(org/name or org/name@revision); check the path"
    )
    assert caught.value.__cause__ is None


def test_a_path_object_is_never_read_as_a_repo_id(hub_cache: HubCache) -> None:
    """``Path("./org/name")`` prints as ``org/name``; the repo of that name is cached here, and
    still a Path that does not exist is refused as a path."""
    with pytest.raises(InputNotFoundError) as caught:
        resolve_model_location(Path(".") / ADAPTER_REPO, "ADAPTER", kind="adapter")

    assert str(caught.value) == f"ADAPTER {ADAPTER_REPO} does not exist: check the path"


def test_cached_listing_limits_the_check_to_files_the_merge_reads(hub_cache: HubCache) -> None:
    """Files the repo has but a merge never reads may be absent from the cache.

    huggingface_hub checks a cached snapshot against the commit's listing for the
    requested patterns; a broad ``*.safetensors`` would report a snapshot lacking
    Mistral-style ``consolidated.safetensors`` or a subfolder as incomplete.
    """
    listing = [
        *hub_cache.base_files,
        "consolidated.safetensors",
        "original/params.json",
        "original/tokenizer.model",
        "pytorch_model.bin",
        "README.md",
    ]
    cache_repo(hub_cache.cache, BASE_REPO, {}, {}, listings={hub_cache.main: listing})

    folder = resolve_model_location(BASE_REPO, "BASE", kind="model")

    assert folder == hub_cache.snapshot(hub_cache.base_storage, hub_cache.main).resolve()


def test_snapshot_missing_a_shard_the_listing_names_is_reported_incomplete(
    hub_cache: HubCache,
) -> None:
    cache_repo(
        hub_cache.cache, BASE_REPO, {}, {}, listings={hub_cache.main: list(hub_cache.base_files)}
    )
    snapshot = hub_cache.snapshot(hub_cache.base_storage, hub_cache.main)
    (snapshot / "model-00002-of-00002.safetensors").unlink()  # an interrupted download

    with pytest.raises(InputNotFoundError, match="is only partly in the cache") as caught:
        resolve_model_location(BASE_REPO, "BASE", kind="model")

    assert "HF_HUB_OFFLINE is set" in str(caught.value)
    assert isinstance(caught.value.__cause__, LocalEntryNotFoundError)


def test_listed_repo_without_adapter_config_is_not_an_adapter(hub_cache: HubCache) -> None:
    cache_repo(
        hub_cache.cache,
        BASE_REPO,
        {},
        {},
        listings={hub_cache.main: list(hub_cache.base_files)},
    )

    with pytest.raises(InputNotFoundError, match=r"the Hub repo has no adapter_config\.json"):
        resolve_model_location(BASE_REPO, "ADAPTER", kind="adapter")


def test_quiet_hides_progress_bars_during_the_call_and_restores_them(
    hub_cache: HubCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_snapshot_download = hub.snapshot_download

    def recording_snapshot_download(*args, **kwargs):
        seen.append(are_progress_bars_disabled())
        return real_snapshot_download(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", recording_snapshot_download)
    assert not are_progress_bars_disabled()

    resolve_model_location(BASE_REPO, "BASE", kind="model", quiet=True)
    resolve_model_location(BASE_REPO, "BASE", kind="model")

    assert seen == [True, False]
    assert not are_progress_bars_disabled()


def test_environment_alone_points_a_fresh_process_at_the_cache(hub_cache: HubCache) -> None:
    """As a user hits it: HF_HOME and HF_HUB_OFFLINE set before huggingface_hub is imported."""
    code = (
        "import json, sys\n"
        "from lora_merge.inputs.hub import resolve_model_location\n"
        "print(json.dumps([\n"
        f"    str(resolve_model_location({BASE_REPO!r}, 'BASE', kind='model')),\n"
        f"    str(resolve_model_location({ADAPTER_REPO + '@main'!r}, 'ADAPTER', kind='adapter')),\n"
        "]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=hub_cache.env(),
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        str(hub_cache.snapshot(hub_cache.base_storage, hub_cache.main).resolve()),
        str(hub_cache.snapshot(hub_cache.adapter_storage, hub_cache.adapter_main).resolve()),
    ]


def test_cli_merges_repo_ids_from_the_cache_offline(hub_cache: HubCache, tmp_path: Path) -> None:
    """End to end: the installed command, given repo ids, merges from the offline cache."""
    out = tmp_path / "merged"

    result = subprocess.run(
        [LORA_MERGE, BASE_REPO, ADAPTER_REPO, str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=hub_cache.env(),
        cwd=tmp_path / "source",  # no org/ folder here: the ids must come from the cache
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file()
    merged = {
        name: tensor
        for shard in sorted(out.glob("*.safetensors"))
        for name, tensor in load_file(shard).items()
    }
    assert "model.layers.0.self_attn.q_proj.weight" in merged
    assert not any("lora_" in name for name in merged)
