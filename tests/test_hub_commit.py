"""The final commit of a Hub push: retried on a failed POST, never made twice; and the one
adapter over huggingface_hub's private commit-operation fields (finish/hub_operations.py).

Each test talks to tests/fake_hub.py through the real huggingface_hub client. The adapter's
tests are the ones to run against the lowest huggingface_hub pyproject.toml declares as well
as the newest (see the lowest-versions CI job).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fake_hub import FakeHub, Fault, start_fake_hub
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.lfs import UploadInfo

from lora_merge.errors import PushError
from lora_merge.finish.hub_commit import create_commit_once
from lora_merge.finish.hub_operations import is_preuploaded, preuploaded_operation

REPO = "me/merged"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    # The fake Hub speaks LFS, not xet (huggingface_hub's own fallback when xet is off).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)  # >= 0.32
    # The suite runs offline (conftest.py); this server is local, the one place to reach.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server, fake = start_fake_hub()
    yield fake
    server.shutdown()


@pytest.fixture
def api(hub: FakeHub) -> HfApi:
    client = HfApi(endpoint=hub.url, token=hub.token)
    client.create_repo(REPO, repo_type="model")
    return client


def commit(api: HfApi, waits: list[float], message: str = "merged") -> str:
    operations = [CommitOperationAdd("config.json", b'{"a": 1}\n')]
    return create_commit_once(api, REPO, operations, message, None, sleep=waits.append)


def test_a_commit_whose_reply_is_lost_is_not_made_again(hub: FakeHub, api: HfApi) -> None:
    """The commit lands, its reply is a 500: the retry finds it and makes no second one."""
    hub.faults = [Fault("/commit/", method="POST", status=500, after_handling=True)]
    waits: list[float] = []

    url = commit(api, waits)

    assert hub.repos[REPO].branch_commits["main"] == ["merged"]
    assert hub.repos[REPO].branches["main"] == {"config.json": b'{"a": 1}\n'}
    newest_commit = hub.repos[REPO].history["main"][0][0]
    assert url == f"{hub.url}/{REPO}/commit/{newest_commit}"
    assert waits == [1.0]


@pytest.mark.parametrize(
    ("fault", "expected_waits"),
    [
        (Fault("/commit/", method="POST", status=503, times=2), [1.0, 2.0]),
        (Fault("/commit/", method="POST", status=429, headers={"Retry-After": "7"}), [7.0]),
    ],
    ids=["server-error-twice", "rate-limited"],
)
def test_a_commit_that_failed_is_sent_again_once(
    hub: FakeHub, api: HfApi, fault: Fault, expected_waits: list[float]
) -> None:
    """Refused before it landed (5xx, or 429 with Retry-After honoured): one commit in the end."""
    hub.faults = [fault]
    waits: list[float] = []

    commit(api, waits)

    assert hub.repos[REPO].branch_commits["main"] == ["merged"]
    assert waits == expected_waits


def test_a_refused_commit_is_not_retried(hub: FakeHub, api: HfApi) -> None:
    """403 is an answer, not a failure: it is raised at once and nothing is committed."""
    hub.faults = [Fault("/commit/", method="POST", status=403, times=5)]
    waits: list[float] = []

    with pytest.raises(Exception, match="403"):
        commit(api, waits)

    assert waits == [] and "main" not in hub.repos[REPO].branch_commits


def test_another_commit_on_the_branch_is_not_taken_for_ours(hub: FakeHub, api: HfApi) -> None:
    """Someone else commits while our reply is lost: our retry stops, it does not commit over it."""
    waits: list[float] = []

    def someone_else_commits(seconds: float) -> None:
        waits.append(seconds)
        api.create_commit(
            REPO, operations=[CommitOperationAdd("other.txt", b"x")], commit_message="other"
        )

    hub.faults = [Fault("/commit/", method="POST", status=502)]
    operations = [CommitOperationAdd("config.json", b"{}")]

    with pytest.raises(PushError, match="another commit"):
        create_commit_once(api, REPO, operations, "merged", None, sleep=someone_else_commits)

    assert hub.repos[REPO].branch_commits["main"] == ["other"]


def test_preupload_marks_lfs_files_only(hub: FakeHub, api: HfApi) -> None:
    """is_preuploaded reads what preupload_lfs_files decided: LFS for shards, not for JSON."""
    shard = CommitOperationAdd("model.safetensors", b"weights" * 100)
    config = CommitOperationAdd("config.json", b"{}")

    api.preupload_lfs_files(REPO, additions=[shard, config], repo_type="model")

    assert is_preuploaded(shard) and not is_preuploaded(config)
    assert hashlib.sha256(b"weights" * 100).hexdigest() in hub.lfs_objects


def test_a_preuploaded_operation_commits_the_object_without_its_bytes(
    hub: FakeHub, api: HfApi
) -> None:
    """An LFS object uploaded by an earlier run is committed by its sha256: no upload again."""
    data = b"shard bytes" * 50
    first = CommitOperationAdd("model.safetensors", data)
    api.preupload_lfs_files(REPO, additions=[first], repo_type="model")
    uploads = [r for r in hub.requests if r.startswith("PUT")]
    info = UploadInfo(size=len(data), sha256=hashlib.sha256(data).digest(), sample=data[:512])

    api.create_commit(
        REPO,
        operations=[preuploaded_operation("model.safetensors", info)],
        commit_message="adopted",
    )

    assert hub.repos[REPO].branches["main"] == {"model.safetensors": data}
    assert [r for r in hub.requests if r.startswith("PUT")] == uploads
