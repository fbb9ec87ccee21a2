"""``--low-disk``: BASE from the Hub without storing its shards.

The small files (config, index, tokenizer, chat template) are downloaded into
huggingface_hub's cache as for any Hub id (:mod:`lora_merge.inputs.hub`); the
weight shards are not. Their size and sha256 come from the Hub's file metadata
(a ``HEAD`` of each ``resolve`` URL, pinned to the snapshot's commit), their
headers from two range requests each, and the stream reads their tensors by
range requests too (:class:`~lora_merge.io.http_reader.RangedTensorReader`).
A base whose shards are all in the cache already is read from the cache.
Tokens, HF_ENDPOINT, revisions and offline mode behave as for any Hub id.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, snapshot_download
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE

from lora_merge.errors import InputNotFoundError
from lora_merge.inputs.hub import (
    download_patterns,
    hub_input_error,
    parse_repo_spec,
    progress_bars_hidden,
)
from lora_merge.inputs.locations import existing_local_path
from lora_merge.inputs.resolve import BaseCheckpoint, resolve_base, shards_from_index
from lora_merge.io.http_reader import RemoteFile


def resolve_ranged_base(spec: str | Path, *, quiet: bool = False) -> BaseCheckpoint:
    """BASE for ``--low-disk``: a local folder as it is, a Hub id without its shards.

    Args:
        spec: a local folder, or ``org/name[@revision]``.
        quiet: hide huggingface_hub's download bars.

    Returns:
        The base; its ``remote`` maps each shard that stays on the Hub to its URL,
        size and sha256 (empty when the folder is local or the cache holds every shard).

    Raises:
        InputNotFoundError: as :func:`~lora_merge.inputs.hub.resolve_model_location`,
            and when HF_HUB_OFFLINE is set and the cache lacks a shard.
        InvalidInputError: a shard's header is corrupt.
    """
    local = existing_local_path(spec)
    if local is not None:
        return resolve_base(local)
    text = str(spec)
    repo_id, revision = parse_repo_spec(text, "BASE")
    with progress_bars_hidden(quiet):
        try:
            patterns = download_patterns(text, "BASE", "model", repo_id, revision)
            small = [p for p in patterns if not p.endswith(".safetensors")]
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=small))
            shards = _shard_names(folder, patterns)
            cached = all((folder / name).is_file() for name in shards)
            # One reader reads every shard: a partly cached base is read from the Hub.
            remote = {} if cached else _remote_files(text, repo_id, folder.name, shards)
        except InputNotFoundError:
            raise
        except Exception as err:
            mapped = hub_input_error(err, text, "BASE", repo_id, revision)
            if mapped is None:
                raise
            raise mapped from err
    return resolve_base(folder, remote)


def _shard_names(folder: Path, patterns: list[str]) -> list[str]:
    """The shards the merge reads: those the index names, else ``model.safetensors``."""
    index = folder / SAFETENSORS_INDEX_FILE
    if index.is_file():
        return sorted(shards_from_index(index, check_files=False))
    if SAFETENSORS_SINGLE_FILE in patterns or "*.safetensors" in patterns:
        return [SAFETENSORS_SINGLE_FILE]
    return []  # pickles only, or nothing: resolve_base says so


def _remote_files(text: str, repo_id: str, commit: str, names: list[str]) -> dict[str, RemoteFile]:
    """Each shard's URL at ``commit``, its size and sha256, from a HEAD request each."""
    if not names:
        return {}
    if constants.HF_HUB_OFFLINE:
        raise InputNotFoundError(
            f"BASE {text}: {names[0]} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; --low-disk reads the "
            "base from the Hub: unset HF_HUB_OFFLINE"
        )
    remote = {}
    for name in names:
        url = hf_hub_url(repo_id, name, revision=commit)
        metadata = get_hf_file_metadata(url, retry_on_errors=True)
        if metadata.size is None:
            raise InputNotFoundError(f"BASE {text}: the Hub did not give the size of {name}")
        etag = (metadata.etag or "").strip('"')
        sha256 = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
        remote[name] = RemoteFile(url=url, size=metadata.size, sha256=sha256)
    return remote
