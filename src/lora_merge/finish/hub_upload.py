"""``--low-disk``: upload each output shard as soon as it is written, then delete it.

A shard is written in the staging folder as usual, then preuploaded to the Hub
(:meth:`huggingface_hub.HfApi.preupload_lfs_files`: the LFS or xet storage, no
commit) on a background thread while the next shard is written, then deleted.
So local disk holds at most two shards: the one uploading and the one being
written. At the end, one ``create_commit`` adds the preuploaded shards and
every file of OUT (index, config, tokenizer, model card): until then nothing is
visible on the Hub, and a failure leaves no commit (the commit is retried, never
made twice: :mod:`lora_merge.finish.hub_commit`). The commit is made from
the staging folder, before it becomes OUT: a failed commit leaves no OUT either.

A resumable run (``--resume``) journals each uploaded shard (name, size, sha256,
first bytes) with the plan's fingerprint in ``.OUTNAME.lora-merge-uploads.json``
beside OUT. A rerun of the same merge to the same repo and branch asks the Hub
which of those LFS objects it holds and writes only the other shards.

This module imports huggingface_hub: :mod:`lora_merge.api` imports it only for
a ``--low-disk`` run (the option checks and the local sink are in
:mod:`lora_merge.finish.shard_sink`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

from lora_merge.errors import PushError
from lora_merge.finish.hub_commit import create_commit_once
from lora_merge.finish.hub_operations import is_preuploaded, preuploaded_operation
from lora_merge.finish.hub_parts import commit_part_journal, read_part_journals, staging_branch
from lora_merge.finish.parts import journal_files
from lora_merge.finish.shard_sink import disk_needed, upload_journal_path
from lora_merge.inputs.hub import progress_bars_hidden
from lora_merge.io.json_files import read_json_object
from lora_merge.options.values import Part


class ShardUploads:
    """Preupload each shard to a Hub repo as it is written, delete it, commit all at the end.

    Use as a context manager; leaving it waits for the upload in flight.

    Args:
        repo_id: the ``--push-to-hub`` repo, created (private if asked) when missing.
        revision: the branch to commit to (created if needed), None for the default one.
        private: create the repo private.
        quiet: hide huggingface_hub's upload bars.
        part: ``--part I/N``: commit a part journal to the staging branch instead
            (:mod:`lora_merge.finish.hub_parts`).
        resume: ``--resume``: adopt the shards that parts uploaded, too.
    """

    remote = True  # shards end on the Hub; this machine keeps none

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None,
        private: bool,
        quiet: bool,
        part: Part | None = None,
        resume: bool = False,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.private = private
        self.quiet = quiet
        self.api = HfApi()
        self.uploaded: dict[str, CommitOperationAdd] = {}  # name -> its preuploaded operation
        self.resumed: list[str] = []  # shards a journal said were uploaded and the Hub holds
        self._journal: Path | None = None
        self._fingerprint: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-merge-upload")
        self._in_flight: Future[None] | None = None
        self.commit_url: str | None = None
        self.part = part
        self.resume = resume
        self.from_parts = False  # True when a staging branch of parts was found
        self.notes: list[str] = []
        self._staging_branch: str | None = None

    def __enter__(self) -> ShardUploads:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def disk_needed(self, shard_sizes: Sequence[int]) -> int:
        """Two shards: the one uploading and the one being written."""
        return disk_needed(shard_sizes, low_disk=True)

    def start(self, out: Path, fingerprint: str | None) -> None:
        """Create the repo and branch; with a fingerprint, adopt a matching upload journal.

        Raises:
            PushError: the Hub refused or could not be reached.
        """
        self._fingerprint = fingerprint
        self._journal = upload_journal_path(out) if fingerprint is not None else None
        with self._push_errors("preparing the upload"):
            self.api.create_repo(
                self.repo_id,
                repo_type="model",
                private=True if self.private else None,
                exist_ok=True,
            )
            if self.revision is not None:
                self.api.create_branch(
                    self.repo_id, branch=self.revision, repo_type="model", exist_ok=True
                )
            self._adopt_journal()
            if fingerprint is not None and (self.part is not None or self.resume):
                self._start_hub_parts(fingerprint)

    def _start_hub_parts(self, fingerprint: str) -> None:
        """A part: create the staging branch. A final step: adopt the parts' shards."""
        self._staging_branch = staging_branch(fingerprint)
        if self.part is not None:
            self.api.create_branch(
                self.repo_id,
                branch=self._staging_branch,
                revision=self.revision,
                repo_type="model",
                exist_ok=True,
            )
            return
        found, records, self.notes = read_part_journals(
            self.api, self.repo_id, self._staging_branch, fingerprint
        )
        self.from_parts = found
        self.uploaded.update(self._adopt_records(records))
        self.resumed = sorted(self.uploaded)

    def has_shard(self, file_name: str) -> bool:
        """True for a shard an earlier run uploaded (journaled, and held by the Hub)."""
        return file_name in self.uploaded

    def shard_written(self, path: Path) -> None:
        """Upload the finished shard at ``path`` in the background, then delete it.

        Waits first for the previous shard's upload, so that at most two shards are
        on disk: this one and the next one being written.

        Raises:
            PushError: the previous upload failed.
        """
        self.wait()
        self._in_flight = self._executor.submit(self._upload, path)

    def wait(self) -> None:
        """Wait for the upload in flight.

        Raises:
            PushError: it failed.
        """
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def commit(self, folder: Path, message: str) -> None:
        """One commit: the uploaded shards and every file of the finished ``folder``.

        Called on the staging folder before it becomes OUT: if the commit fails, no
        OUT appears either. Sets :attr:`commit_url`.

        A part (``--part``) commits its journal to the staging branch instead, and
        the final step deletes that branch after its commit.

        Raises:
            PushError: the Hub refused the commit; nothing is committed.
        """
        self.wait()
        if self.part is not None:
            self._commit_part(self.part)
            return
        # The staging folder's resume journal (a resumed run's) is no file of OUT.
        journals = set(journal_files(folder))
        files = sorted(p for p in folder.iterdir() if p.is_file() and p not in journals)
        operations = [*self.uploaded.values()]
        operations += [CommitOperationAdd(path.name, path) for path in files]
        with self._push_errors("committing the uploaded shards"), progress_bars_hidden(self.quiet):
            self.commit_url = create_commit_once(
                self.api, self.repo_id, operations, message, self.revision
            )
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)
        if self.from_parts and self._staging_branch is not None:
            with self._push_errors(f"deleting the parts' branch {self._staging_branch}"):
                self.api.delete_branch(self.repo_id, branch=self._staging_branch)

    def _commit_part(self, part: Part) -> None:
        """Commit ``part``'s journal (its uploaded shards) to the staging branch."""
        assert self._staging_branch is not None and self._fingerprint is not None
        with self._push_errors(f"committing part {part}'s journal"):
            self.commit_url = commit_part_journal(
                self.api,
                self.repo_id,
                self._staging_branch,
                part,
                self._fingerprint,
                self._records(),
            )
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)

    def _upload(self, path: Path) -> None:
        operation = CommitOperationAdd(path.name, path)
        with self._push_errors(f"uploading {path.name}"), progress_bars_hidden(self.quiet):
            self.api.preupload_lfs_files(
                self.repo_id, additions=[operation], repo_type="model", revision=self.revision
            )
        if not is_preuploaded(operation):
            # The Hub wants it as a regular (non-LFS) file: it stays in OUT and goes
            # with the small files in the final commit.
            return
        self.uploaded[path.name] = operation
        self._write_journal()
        path.unlink()

    def _write_journal(self) -> None:
        if self._journal is None:
            return
        journal = {
            "fingerprint": self._fingerprint,
            "repo": self.repo_id,
            "revision": self.revision,
            "shards": self._records(),
        }
        temporary = self._journal.with_name(self._journal.name + ".tmp")
        temporary.write_text(json.dumps(journal, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, self._journal)

    def _records(self) -> dict[str, dict[str, object]]:
        """Each uploaded shard's size, sha256 and first bytes, by name (journals keep them)."""
        return {
            name: {
                "size": op.upload_info.size,
                "sha256": op.upload_info.sha256.hex(),
                "sample": op.upload_info.sample.hex(),
            }
            for name, op in self.uploaded.items()
        }

    def _adopt_journal(self) -> None:
        """Take the uploaded shards of a journal of this merge, if the Hub still holds them."""
        if self._journal is None or not self._journal.is_file():
            return
        journal = read_json_object(self._journal)
        same = (journal.get("fingerprint"), journal.get("repo"), journal.get("revision"))
        shards = journal.get("shards")
        if same != (self._fingerprint, self.repo_id, self.revision) or not isinstance(shards, dict):
            return
        self.uploaded = self._adopt_records(shards)
        self.resumed = sorted(self.uploaded)

    def _adopt_records(self, shards: dict[str, Any]) -> dict[str, CommitOperationAdd]:
        """Preuploaded operations for the journaled ``shards`` whose LFS object the Hub holds."""
        operations = {}
        for name, record in shards.items():
            operations[name] = preuploaded_operation(
                str(name),
                UploadInfo(
                    size=int(record["size"]),
                    sha256=bytes.fromhex(record["sha256"]),
                    sample=bytes.fromhex(record["sample"]),
                ),
            )
        held = self._objects_on_hub([op.upload_info for op in operations.values()])
        return {name: op for name, op in operations.items() if op.upload_info.sha256.hex() in held}

    def _objects_on_hub(self, infos: list[UploadInfo]) -> set[str]:
        """The sha256 of those LFS objects the Hub already holds (its batch API says so)."""
        if not infos:
            return set()
        actions, _errors, _transfer = post_lfs_batch_info(
            infos,
            token=None,
            repo_type="model",
            repo_id=self.repo_id,
            revision=self.revision,
            endpoint=constants.ENDPOINT,
        )
        return {action["oid"] for action in actions if not action.get("actions")}

    def _push_errors(self, doing: str) -> _PushErrors:
        return _PushErrors(doing, self.repo_id)


class _PushErrors:
    """Turn huggingface_hub's exceptions into one PushError that says nothing was committed."""

    def __init__(self, doing: str, repo_id: str) -> None:
        self.doing = doing
        self.repo_id = repo_id

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if error is None or not isinstance(error, Exception) or isinstance(error, PushError):
            return
        text = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise PushError(
            f"--low-disk: {self.doing} to {self.repo_id!r} failed: {type(error).__name__}: "
            f"{text}; nothing was committed; check HF_TOKEN and the repo name, then rerun "
            "(with --resume, shards already uploaded are not written again)"
        ) from error
