"""One commit to the Hub, retried without ever making two.

huggingface_hub retries its downloads and LFS uploads, but not the commit
``POST``: a dropped connection or a 5xx there fails the whole push, and a
naive retry could commit twice when the first request landed and only its
reply was lost. Each attempt here names the branch head it started from as
``parent_commit``, so the Hub refuses any commit made on top of another one
(412); before a retry the branch's newest commit says whether the lost one
landed (then it is the result) or not (then the same commit is sent again).
A 429 waits as long as the Hub's ``Retry-After`` says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from huggingface_hub import CommitOperation, HfApi
from huggingface_hub.utils import HfHubHTTPError

from lora_merge.errors import PushError

COMMIT_ATTEMPTS = 3
FIRST_RETRY_WAIT_S = 1.0  # doubled for each further retry
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After fails the push; --resume picks it up later
# 412: the branch moved since the attempt began (perhaps by our own lost commit).
RETRIED_STATUSES = frozenset({408, 412, 429, 500, 502, 503, 504})


def _transport_errors() -> tuple[type[Exception], ...]:
    """What the HTTP client raises for a dropped connection or a timeout."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    try:  # huggingface_hub >= 1.0
        from httpx2 import TransportError

        errors.append(TransportError)
    except ImportError:  # pragma: no cover - huggingface_hub < 1.0 talks through requests
        from requests import ConnectionError as RequestsConnectionError
        from requests import Timeout

        errors += [RequestsConnectionError, Timeout]
    return tuple(errors)


def create_commit_once(
    api: HfApi,
    repo_id: str,
    operations: Sequence[CommitOperation],
    message: str,
    revision: str | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Commit ``operations`` to ``revision``, retrying a failed ``POST``; never commit twice.

    Args:
        api: the client (endpoint and token).
        repo_id: the model repo.
        operations: what the commit adds.
        message: the commit message (one line: it is how a lost commit is recognised).
        revision: the branch, None for the default one.
        sleep: waits between attempts (tests pass a recorder).

    Returns:
        The commit's URL.

    Raises:
        PushError: another commit landed on the branch while this one was retried.
        HfHubHTTPError: the Hub refused the commit, or failed on every attempt.
    """
    parent = api.repo_info(repo_id, revision=revision, repo_type="model").sha
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            commit = api.create_commit(
                repo_id,
                operations=list(operations),
                commit_message=message,
                repo_type="model",
                revision=revision,
                parent_commit=parent,
            )
            return str(commit.commit_url)
        except Exception as err:
            if attempt + 1 == COMMIT_ATTEMPTS or not _may_retry(err):
                raise
            sleep(_wait_before_retry(err, attempt))
            landed = _landed_commit_url(api, repo_id, revision, parent, message)
            if landed is not None:
                return landed
    raise AssertionError("unreachable: the last attempt returns or raises")


def _may_retry(err: Exception) -> bool:
    if isinstance(err, HfHubHTTPError):
        response = err.response
        return response is not None and response.status_code in RETRIED_STATUSES
    return isinstance(err, _transport_errors())


def _wait_before_retry(err: Exception, attempt: int) -> float:
    """The Hub's ``Retry-After`` (in seconds) on a 429, else a doubling backoff.

    Raises:
        err: the Hub asks for a longer wait than :data:`MAX_RETRY_AFTER_S`.
    """
    response = err.response if isinstance(err, HfHubHTTPError) else None
    if response is not None and response.status_code == 429:
        value = (response.headers.get("Retry-After") or "").strip()
        if value.isdigit():  # the HTTP-date form is rare on the Hub; it gets the backoff
            if float(value) > MAX_RETRY_AFTER_S:
                raise err
            return float(value)
    return FIRST_RETRY_WAIT_S * 2**attempt


def _landed_commit_url(
    api: HfApi, repo_id: str, revision: str | None, parent: str | None, message: str
) -> str | None:
    """The URL of our commit if a lost attempt landed; None if the branch is still at ``parent``.

    Raises:
        PushError: someone else's commit moved the branch.
    """
    newest, *older = api.list_repo_commits(repo_id, revision=revision, repo_type="model")
    if newest.commit_id == parent:
        return None
    title = message.strip().splitlines()[0] if message.strip() else ""
    if newest.title.strip() == title and older and older[0].commit_id == parent:
        return f"{api.endpoint}/{repo_id}/commit/{newest.commit_id}"
    raise PushError(
        f"--low-disk: another commit ({newest.commit_id[:12]}: {newest.title!r}) landed on "
        f"{repo_id}@{revision or 'main'} while this merge was committing; nothing of this "
        "merge was committed: rerun with --resume (uploaded shards are not written again)"
    )
