"""``--push-to-hub``: upload the finished OUT folder to a Hub repo.

huggingface_hub does the work (token from HF_TOKEN or ``hf auth login``,
endpoint from HF_ENDPOINT; with hf_xet installed the upload is chunked,
deduplicated and resumable, and large folders are split into several commits).
This module creates the repo and the branch when they do not exist and turns
huggingface_hub's exceptions into one :class:`~lora_merge.errors.PushError`
that says OUT is complete and how to retry the upload alone.
"""

from __future__ import annotations

from pathlib import Path

from lora_merge.errors import PushError

# huggingface_hub (and lora_merge.inputs.hub, which imports it) is imported inside the
# functions: only a run with --push-to-hub needs it, and it costs about 0.3 s to import.


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    message: str,
    quiet: bool = False,
) -> str:
    """Upload every file of ``folder`` to the model repo ``repo_id``.

    Args:
        folder: the finished OUT folder.
        repo_id: ``org/name``; created (private if asked) when it does not exist.
        private: make a repo that this call creates private (an existing repo keeps its visibility).
        revision: the branch to commit to, created from the default branch if needed;
            None for the default branch.
        message: the commit message.
        quiet: hide huggingface_hub's upload progress bars (shown on stderr otherwise).

    Returns:
        The URL of the commit.

    Raises:
        PushError: the Hub refused or could not be reached; ``folder`` stays as it is.
    """
    from huggingface_hub import HfApi

    from lora_merge.inputs.hub import progress_bars_hidden

    api = HfApi()
    try:
        # private=None (not False) when not asked: a new repo then gets its owner's default visibility.
        api.create_repo(
            repo_id, repo_type="model", private=True if private else None, exist_ok=True
        )
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        with progress_bars_hidden(quiet):
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=message,
            )
    except Exception as err:  # huggingface_hub raises HTTP, network and validation errors alike
        retry = f"hf upload {repo_id} {folder}" + (f" --revision {revision}" if revision else "")
        raise PushError(
            f"the merged model is complete in {folder}, but pushing it to {repo_id!r} failed: "
            f"{type(err).__name__}: {_first_line(err)}; check HF_TOKEN and the repo name, then "
            f"upload it with: {retry}"
        ) from err
    return str(commit.commit_url)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"
