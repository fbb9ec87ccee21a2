"""The one place that reaches past huggingface_hub's public API: preuploaded commit operations.

``HfApi.preupload_lfs_files`` uploads a :class:`~huggingface_hub.CommitOperationAdd`'s
content and marks the operation as uploaded, so that ``create_commit`` names the
LFS object instead of sending the bytes again. huggingface_hub has no public way to
ask whether that happened (the Hub may want a file as a regular one instead), nor to
build an operation for an LFS object an earlier run uploaded: both need the
operation's private fields ``_upload_mode`` and ``_is_uploaded``, which it has had
from huggingface_hub 0.14 to today. Only this module touches them, and
tests/test_hub_commit.py runs it against the lowest and the newest huggingface_hub
that pyproject.toml declares.
"""

from __future__ import annotations

from huggingface_hub import CommitOperationAdd
from huggingface_hub.lfs import UploadInfo


def is_preuploaded(operation: CommitOperationAdd) -> bool:
    """True when ``preupload_lfs_files`` stored the content as an LFS object.

    False when the Hub wants the file as a regular (non-LFS) one: its bytes then go
    in the commit itself.
    """
    return bool(operation._is_uploaded)


def preuploaded_operation(path_in_repo: str, upload_info: UploadInfo) -> CommitOperationAdd:
    """An add operation for an LFS object the repo already holds, without its content.

    Args:
        path_in_repo: where the commit puts the file.
        upload_info: the object's size, sha256 and first bytes, as an earlier run's
            ``preupload_lfs_files`` computed them.

    Returns:
        An operation that ``create_commit`` commits by the object's sha256 alone.
    """
    operation = CommitOperationAdd(path_in_repo, b"")
    operation.upload_info = upload_info
    operation._upload_mode = "lfs"
    operation._is_uploaded = True
    return operation
