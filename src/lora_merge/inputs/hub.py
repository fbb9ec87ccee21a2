"""Turn BASE or ADAPTER given as a Hugging Face Hub repo id into a local snapshot folder.

``org/name`` or ``org/name@revision`` (a branch, a tag or a commit hash) is resolved
with huggingface_hub into a folder of its cache, downloading only the files a merge
reads. Everything huggingface_hub already handles (HF_TOKEN, HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE, resuming a partial download) is left to it; this module only decides
which files to fetch and turns huggingface_hub's exceptions into
:class:`~lora_merge.errors.InputNotFoundError` with a message that says what to do.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    validate_repo_id,
)

from lora_merge.errors import InputNotFoundError
from lora_merge.inputs.locations import existing_local_path
from lora_merge.inputs.resolve import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_NAME,
    ADAPTER_SAFETENSORS_NAME,
)
from lora_merge.io.json_files import read_json_object

try:
    # huggingface_hub >= 1.0 talks HTTP through httpx2; a connection that drops in the
    # middle of a file download surfaces as one of its TransportErrors.
    from httpx2 import TransportError as _TransportError
except (
    ImportError
):  # pragma: no cover - older huggingface_hub use requests, whose errors are OSErrors
    _TransportError = OSError  # type: ignore[assignment,misc]

SAFETENSORS_INDEX_NAME = constants.SAFETENSORS_INDEX_FILE  # model.safetensors.index.json
SAFETENSORS_SINGLE_NAME = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"

# Files besides the weights that the output folder copies or the merge reads: config,
# generation config, tokenizer (tokenizer.json, vocab.json, merges.txt, vocab.txt,
# tokenizer.model, spiece.model, ...) and chat templates. See finish/folder.py.
SIDE_FILE_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model")

# Used when the repo's file list is unknown. Offline with no listing in the cache,
# snapshot_download returns the cached snapshot as it is and the patterns check nothing;
# online, the listing fails only when the Hub does, and snapshot_download then mostly
# fails the same way. Pickles are left out so that they are never reported missing.
FALLBACK_PATTERNS = {
    "model": ("*.safetensors", *SIDE_FILE_PATTERNS),
    "adapter": (ADAPTER_SAFETENSORS_NAME, *SIDE_FILE_PATTERNS),
}

REPO_SPEC_HELP = "org/name or org/name@revision"


def resolve_model_location(spec: str | Path, role: str, *, kind: str, quiet: bool = False) -> Path:
    """Return a local folder for BASE or ADAPTER, downloading it from the Hub if needed.

    A path that exists is returned as given (after ``~`` expansion), even when it is
    also spelled like a repo id: a local folder always wins. Otherwise ``spec`` must be a
    Hub repo id, ``org/name`` or ``org/name@revision`` (a branch, tag or full commit
    hash). Only the files a merge needs are downloaded into huggingface_hub's cache
    (HF_HOME / HF_HUB_CACHE); with HF_HUB_OFFLINE=1 the cached snapshot is used as is.

    For ``kind="model"`` that is ``model.safetensors`` or the index and the shards it
    names (pickled ``pytorch_model*.bin`` only when the repo has no safetensors at all),
    and the config, generation config, tokenizer and chat-template files at the top of
    the repo. For ``kind="adapter"`` it is ``adapter_config.json``,
    ``adapter_model.safetensors`` (``adapter_model.bin`` only when there is no
    safetensors) and the same side files.

    Args:
        spec: a local path, or a Hub repo id with an optional ``@revision``.
        role: ``"BASE"`` or ``"ADAPTER"``, the name messages use for the input.
        kind: ``"model"`` or ``"adapter"``: which files to download.
        quiet: hide huggingface_hub's download progress bars (shown on stderr otherwise).

    Returns:
        The local path, or the snapshot folder ``.../models--org--name/snapshots/<commit>``.

    Raises:
        InputNotFoundError: ``spec`` is neither an existing path nor a valid repo id; the
            repo, the revision or the files a merge needs do not exist or cannot be
            accessed; or the Hub cannot be reached and the cache does not hold the repo.
        ValueError: ``kind`` is not ``"model"`` or ``"adapter"`` (a programming error).
    """
    if kind not in FALLBACK_PATTERNS:
        raise ValueError(f"kind must be 'model' or 'adapter', not {kind!r}")
    local = existing_local_path(spec)
    if local is not None:
        return local
    text = str(spec)
    if isinstance(spec, Path):
        # A Path is a path: str() has dropped a leading "./", so it may read as a repo id.
        raise InputNotFoundError(f"{role} {text} does not exist: check the path")
    repo_id, revision = parse_repo_spec(text, role)
    with progress_bars_hidden(quiet):
        try:
            patterns = download_patterns(text, role, kind, repo_id, revision)
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except InputNotFoundError:
            raise
        except Exception as err:
            mapped = hub_input_error(err, text, role, repo_id, revision)
            if mapped is None:
                raise
            raise mapped from err
    return Path(folder)


def parse_repo_spec(text: str, role: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into the repo id and the revision (None: the default branch).

    Raises:
        InputNotFoundError: ``text`` is not a repo id, so it was meant as a path that does
            not exist.
    """
    repo_id, at, revision = text.partition("@")
    # validate_repo_id also accepts a bare "name" (legacy ids such as "gpt2"); requiring
    # the namespace keeps a mistyped local folder name from becoming a Hub request.
    if repo_id.count("/") == 1 and _is_valid_repo_id(repo_id) and _is_valid_revision(at, revision):
        return repo_id, revision or None
    raise InputNotFoundError(
        f"{role} {text} does not exist: it is neither a folder nor a Hugging Face Hub repo id "
        f"({REPO_SPEC_HELP}); check the path"
    )


def _is_valid_repo_id(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _is_valid_revision(at: str, revision: str) -> bool:
    """A loose check of git's ref-name rules: enough to keep odd text out of cache paths."""
    if not at:
        return True
    return (
        bool(revision)
        and revision.isprintable()
        and not any(char.isspace() or char in "\\~^:?*[" for char in revision)
        and ".." not in revision
        and not revision.startswith("/")
        and not revision.endswith("/")
    )


@contextmanager
def progress_bars_hidden(quiet: bool) -> Iterator[None]:
    """Hide huggingface_hub's progress bars inside the block if ``quiet``, then restore them."""
    if not quiet or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def download_patterns(
    text: str, role: str, kind: str, repo_id: str, revision: str | None
) -> list[str]:
    """The allow_patterns for snapshot_download: exact file names when the file list is known.

    Raises:
        InputNotFoundError: the repo's file list shows it lacks what a merge needs.
    """
    files = _repo_files(repo_id, revision)
    if files is None:
        return list(FALLBACK_PATTERNS[kind])
    # A merge reads the top of the snapshot only: files in subfolders (another
    # checkpoint format under original/, ONNX exports, ...) are never needed.
    top = [name for name in files if "/" not in name]
    if kind == "model":
        weights = _model_weight_names(text, role, top, lambda: _shards_in_index(repo_id, revision))
    else:
        weights = _adapter_file_names(text, role, top)
    side_files = [name for name in top if _matches(name, SIDE_FILE_PATTERNS)]
    # Exact names, escaped: a file name may contain "[" or "*", which fnmatch would read as
    # a pattern.
    return [glob.escape(name) for name in dict.fromkeys([*weights, *side_files])]


def _repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's file names at ``revision``: from the Hub, else from the cached listing.

    None when neither can be had (offline, and a huggingface_hub too old to cache
    listings or a snapshot downloaded without one).
    """
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:
            # The listing only narrows the download. snapshot_download runs next with the
            # same repo and revision and is the one authority on what went wrong (repo not
            # found, no network) and on whether the cache can serve the request instead.
            pass
    # huggingface_hub >= 1.x keeps each downloaded commit's file list in the cache
    # (trees/<commit>.json) and checks cached snapshots against it; reading the same
    # list offline makes the offline request match what the online run downloaded.
    cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if cached_tree is None:  # pragma: no cover - older huggingface_hub
        return None
    try:
        return [entry.path for entry in cached_tree(repo_id, revision=revision)]
    except Exception:  # CachedRepoTreeNotFoundError: no listing; snapshot_download decides
        return None


def _model_weight_names(
    text: str, role: str, top: list[str], shards_in_index: Callable[[], list[str] | None]
) -> list[str]:
    """Which base weights to fetch: the safetensors the merge reads, else the pickles."""
    if SAFETENSORS_INDEX_NAME in top:
        shards = shards_in_index()
        if shards is None:  # unreadable index: take every top-level safetensors file
            shards = [name for name in top if name.endswith(".safetensors")]
        return [SAFETENSORS_INDEX_NAME, *shards]
    if SAFETENSORS_SINGLE_NAME in top:
        return [SAFETENSORS_SINGLE_NAME]
    pickles = [name for name in top if fnmatch(name, "pytorch_model*.bin")]
    if pickles:
        # Fetched so that the base check can name them; only when there is no safetensors.
        return [*pickles, *([PICKLE_INDEX_NAME] if PICKLE_INDEX_NAME in top else [])]
    others = [name for name in top if name.endswith(".safetensors")]
    found = f" (it has {', '.join(others[:3])})" if others else ""
    raise InputNotFoundError(
        f"{role} {text}: the Hub repo has no {SAFETENSORS_SINGLE_NAME} or "
        f"{SAFETENSORS_INDEX_NAME} at its top level{found}; point {role} at a Hugging Face "
        "transformers model repo or folder"
    )


def _adapter_file_names(text: str, role: str, top: list[str]) -> list[str]:
    """The adapter's config and weights (the pickle only when there is no safetensors)."""
    if ADAPTER_CONFIG_NAME not in top:
        raise InputNotFoundError(
            f"{role} {text}: the Hub repo has no {ADAPTER_CONFIG_NAME}; point {role} at a "
            "repo or folder written by PEFT's save_pretrained() or push_to_hub()"
        )
    for name in (ADAPTER_SAFETENSORS_NAME, ADAPTER_PICKLE_NAME):
        if name in top:
            return [ADAPTER_CONFIG_NAME, name]
    raise InputNotFoundError(
        f"{role} {text}: the Hub repo has no {ADAPTER_SAFETENSORS_NAME} or {ADAPTER_PICKLE_NAME}"
    )


def _shards_in_index(repo_id: str, revision: str | None) -> list[str] | None:
    """The shard names in the repo's model.safetensors.index.json; None if it cannot be read.

    Only shards the index names are fetched: some repos also keep the same weights in
    another layout (Mistral's consolidated.safetensors) that would double the download.
    """
    try:
        index_path = hf_hub_download(repo_id, SAFETENSORS_INDEX_NAME, revision=revision)
        weight_map = read_json_object(Path(index_path)).get("weight_map")
    except Exception:
        # A missing or broken index is reported by the base check with its own message,
        # once the snapshot is there; fetching every top-level shard keeps that possible.
        return None
    if not isinstance(weight_map, dict):
        return None
    # Names that are not plain file names are refused later by the base check.
    names = {name for name in weight_map.values() if isinstance(name, str) and "/" not in name}
    return sorted(names)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class HubInput:
    """BASE or ADAPTER given as a Hub repo id, as the messages about it name it."""

    text: str
    role: str
    repo_id: str
    revision: str | None

    @property
    def where(self) -> str:
        at = f" at revision {self.revision}" if self.revision else ""
        return f"{self.role} {self.text} is not a local folder, and the Hub repo {self.repo_id}{at}"


def _offline_reason() -> str:
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return "the Hub cannot be reached (no network?)"


def _gated(err: GatedRepoError, hub: HubInput) -> str:
    return (
        f"{hub.where} is gated and your account has no access: request it at "
        f"{constants.ENDPOINT}/{hub.repo_id}, then log in with `hf auth login` or set HF_TOKEN"
    )


def _disabled(err: DisabledRepoError, hub: HubInput) -> str:
    return f"{hub.where} has been disabled on the Hub; use another repo or a local folder"


def _repo_not_found(err: RepositoryNotFoundError, hub: HubInput) -> str:
    return (
        f"{hub.where} cannot be found: check the spelling; for a private repo, log in with "
        "`hf auth login` or set HF_TOKEN to a token that can read it"
    )


def _revision_not_found(err: RevisionNotFoundError, hub: HubInput) -> str:
    return (
        f"{hub.role} {hub.text}: the Hub repo {hub.repo_id} has no revision {hub.revision!r}: "
        "use an existing branch, tag or full commit hash"
    )


def _not_in_cache(err: LocalEntryNotFoundError, hub: HubInput) -> str:
    snapshot_path = getattr(err, "snapshot_path", None)
    if snapshot_path is not None:
        # IncompleteSnapshotError (huggingface_hub >= 1.x): the cached listing of the
        # commit names files the snapshot lacks.
        return (
            f"{hub.where} is only partly in the cache ({snapshot_path}) and {_offline_reason()}: "
            "rerun once online to finish the download, or pass a local folder"
        )
    return (
        f"{hub.where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"{_offline_reason()}: download it once online (e.g. `hf download {hub.repo_id}`, "
        "with HF_HUB_OFFLINE unset), point HF_HOME at the cache that holds it, or pass a "
        "local folder"
    )


def _http_error(err: HfHubHTTPError, hub: HubInput) -> str:
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return (
            f"{hub.where} cannot be read: the Hub refused the credentials (401); check HF_TOKEN "
            "or log in again with `hf auth login`"
        )
    return (
        f"{hub.where} could not be downloaded: the Hub answered {status or 'with an error'}; "
        "try again later, or pass a local folder"
    )


def _connection_failed(err: Exception, hub: HubInput) -> str:
    return (
        f"{hub.where} could not be downloaded: the connection failed ({err}); rerun to resume "
        "the download, or pass a local folder"
    )


def _cache_not_writable(err: OSError, hub: HubInput) -> str:
    return (
        f"{hub.where} could not be stored in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
        f"{err}; free space or fix permissions there, or set HF_HOME to another folder"
    )


# huggingface_hub's error -> our message, first match wins, as huggingface_hub's own
# cli/_errors.py maps them. The order matters: GatedRepoError is a RepositoryNotFoundError,
# the repo errors and DisabledRepoError are HfHubHTTPErrors, IncompleteSnapshotError is a
# LocalEntryNotFoundError, and a dropped connection is an OSError (with an older
# huggingface_hub, which talks through requests, every OSError is taken for one).
HUB_ERROR_MESSAGES: dict[type[Exception] | tuple[type[Exception], ...], Callable[..., str]] = {
    GatedRepoError: _gated,
    DisabledRepoError: _disabled,
    RepositoryNotFoundError: _repo_not_found,
    RevisionNotFoundError: _revision_not_found,
    LocalEntryNotFoundError: _not_in_cache,
    HfHubHTTPError: _http_error,
    (_TransportError, ConnectionError, TimeoutError): _connection_failed,
    OSError: _cache_not_writable,
}


def hub_input_error(
    err: Exception, text: str, role: str, repo_id: str, revision: str | None
) -> InputNotFoundError | None:
    """Our error for one of huggingface_hub's, or None when ``err`` is not about the input.

    Args:
        err: what huggingface_hub raised while listing or downloading the repo.
        text: BASE or ADAPTER as the user gave it.
        role: ``"BASE"`` or ``"ADAPTER"``.
        repo_id: the repo id parsed from ``text``.
        revision: the revision parsed from ``text`` (None: the default branch).

    Returns:
        An :class:`~lora_merge.errors.InputNotFoundError` whose message says what to do,
        from the first entry of :data:`HUB_ERROR_MESSAGES` that ``err`` is an instance of.
    """
    hub = HubInput(text=text, role=role, repo_id=repo_id, revision=revision)
    for error_types, message in HUB_ERROR_MESSAGES.items():
        if isinstance(err, error_types):
            return InputNotFoundError(message(err, hub))
    return None
