"""Resolve BASE, ADAPTER and OUT into checked locations before any work starts.

Everything that can be refused cheaply is refused here: missing folders, missing
weights, an index that names files that are not there, an OUT that exists or
lies inside an input.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_merge.errors import InputNotFoundError, InvalidInputError, OutputError
from lora_merge.io.formats.registry import (
    LogicalTensor,
    QuantizedBase,
    find_quantized_base,
    logical_tensors,
)
from lora_merge.io.hub_names import (
    CONFIG_NAME,
    SAFETENSORS_INDEX_FILE,
    SAFETENSORS_SINGLE_FILE,
)
from lora_merge.io.json_files import read_json_object
from lora_merge.io.safetensors_format import (
    SafetensorsHeader,
    TensorEntry,
    parse_safetensors_header,
    read_safetensors_header,
)

if TYPE_CHECKING:  # a Hub base only: its range requests import httpx
    from lora_merge.io.http_reader import RangeFetcher, RemoteFile

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"

PICKLED_BASE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_FILE_NAME_BYTES = 255  # NAME_MAX on Linux and macOS: longer names cannot be files


@dataclass(frozen=True)
class BaseCheckpoint:
    """The base model's folder and every tensor in its safetensors files.

    Attributes:
        folder: the base folder (absolute).
        entries: stored tensor name -> location, in file order (shard by shard, then offset).
        config: the parsed config.json, or an empty dict when the folder has none.
        quantization: the quantized weights (bitsandbytes, FP8, MXFP4 ...), or None for an
            unquantized base.
        tensors: the tensors as the model sees them (quantized weights as their
            dequantized dtype and shape, auxiliary quantization tensors left out),
            in file order: what the planner plans.
        remote: the shards read from the Hub by range requests (``--low-disk``), by the
            path their entries name (in ``folder``, where they are not stored); empty
            when every shard is a local file.
    """

    folder: Path
    entries: dict[str, TensorEntry]
    config: dict[str, object]
    quantization: QuantizedBase | None = None
    tensors: dict[str, LogicalTensor] = field(default_factory=dict)
    remote: dict[Path, RemoteFile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tensors:  # built by hand from entries alone
            weights = self.quantization.weights if self.quantization is not None else {}
            object.__setattr__(self, "tensors", logical_tensors(self.entries, weights))


@dataclass(frozen=True)
class AdapterFolder:
    """The adapter's folder, its config file and its weights file.

    A loralib checkpoint is a single file with no config: ``config_path`` is
    None and ``folder`` is the file's folder (guarded like any input's).
    """

    folder: Path
    config_path: Path | None
    weights_path: Path

    @property
    def location(self) -> Path:
        """What reports call the adapter: its folder, or the file of a config-less (loralib) one."""
        return self.folder if self.config_path is not None else self.weights_path


def resolve_base(
    base: Path | str, remote_shards: dict[str, RemoteFile] | None = None
) -> BaseCheckpoint:
    """Find and index the base checkpoint's safetensors files.

    Args:
        base: the base folder.
        remote_shards: shards that are not in the folder but on the Hub, by file name
            (``--low-disk``): their headers are read by range requests.

    Raises:
        InputNotFoundError: the folder, its weights or a shard named by the index is missing.
        InvalidInputError: the index or a shard is corrupt, or a key is in two shards.
    """
    folder = _existing_folder(base, "BASE")
    remote_shards = remote_shards or {}
    index_path = folder / SAFETENSORS_INDEX_FILE
    # shard file name -> the keys the index promises in it (None: no index)
    shard_names: dict[str, set[str] | None]
    if index_path.is_file():
        shard_names = dict(shards_from_index(index_path, set(remote_shards)))
    elif SAFETENSORS_SINGLE_FILE in remote_shards or (folder / SAFETENSORS_SINGLE_FILE).is_file():
        shard_names = {SAFETENSORS_SINGLE_FILE: None}
    else:
        pickled = [name for name in PICKLED_BASE_NAMES if (folder / name).exists()]
        if pickled:
            raise InvalidInputError(
                f"BASE {folder} holds only pickled weights ({pickled[0]}); lora-merge reads "
                "safetensors: convert the base first (e.g. load it with transformers and "
                "save_pretrained(safe_serialization=True))"
            )
        raise InputNotFoundError(
            f"BASE {folder} has no {SAFETENSORS_SINGLE_FILE} or {SAFETENSORS_INDEX_FILE}: "
            "point BASE at a Hugging Face model folder"
        )

    entries: dict[str, TensorEntry] = {}
    fetcher = None
    if remote_shards:
        from lora_merge.io.http_reader import RangeFetcher

        fetcher = RangeFetcher()
    for shard_name, expected_keys in shard_names.items():
        header = _shard_header(folder, shard_name, remote_shards.get(shard_name), fetcher)
        for entry in header.entries:
            if entry.name in entries:
                raise InvalidInputError(
                    f"tensor {entry.name!r} is stored twice in BASE ({entries[entry.name].path.name} "
                    f"and {shard_name}); the checkpoint is inconsistent"
                )
            entries[entry.name] = entry
        if expected_keys is not None:
            found = {entry.name for entry in header.entries}
            missing = sorted(expected_keys - found)
            if missing:
                raise InvalidInputError(
                    f"{SAFETENSORS_INDEX_FILE} says {missing[0]!r} is in {shard_name}, but it is "
                    "not there; the checkpoint is inconsistent (re-download it)"
                )
    config_path = folder / CONFIG_NAME
    config = read_json_object(config_path) if config_path.is_file() else {}
    quantization = find_quantized_base(entries, config)
    return BaseCheckpoint(
        folder=folder,
        entries=entries,
        config=config,
        quantization=quantization,
        remote={
            folder / name: remote_shards[name] for name in shard_names if name in remote_shards
        },
    )


def _shard_header(
    folder: Path, name: str, remote: RemoteFile | None, fetcher: RangeFetcher | None
) -> SafetensorsHeader:
    """A shard's header: from the local file, or by two range requests to the Hub."""
    if remote is None:
        path = check_stays_inside(folder, name)  # before anything of it is read
        return read_safetensors_header(path)
    assert fetcher is not None, "a remote shard comes with its fetcher"
    return parse_safetensors_header(
        folder / name, remote.size, lambda offset, n: fetcher.read_at(remote.url, offset, n)
    )


def resolve_adapter(adapter: Path | str) -> AdapterFolder:
    """Find the adapter's config and weights file.

    Raises:
        InputNotFoundError: the folder, adapter_config.json or the weights are missing.
    """
    if Path(adapter).expanduser().is_file():
        raise InvalidInputError(
            f"ADAPTER {adapter} is a file: for a loralib (microsoft/LoRA) checkpoint pass "
            "--rank R --alpha A; for a PEFT adapter pass the folder save_pretrained() wrote"
        )
    folder = _existing_folder(adapter, "ADAPTER")
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise InputNotFoundError(
            f"ADAPTER {folder} has no {ADAPTER_CONFIG_NAME}: point ADAPTER at the folder "
            "PEFT's save_pretrained() wrote"
        )
    for name in (ADAPTER_SAFETENSORS_NAME, ADAPTER_PICKLE_NAME):
        if (folder / name).is_file():
            weights_path = check_stays_inside(folder, name)
            return AdapterFolder(folder=folder, config_path=config_path, weights_path=weights_path)
    raise InputNotFoundError(
        f"ADAPTER {folder} has no {ADAPTER_SAFETENSORS_NAME} or {ADAPTER_PICKLE_NAME}"
    )


def resolve_adapter_file(adapter: Path | str) -> AdapterFolder:
    """A config-less adapter file (a loralib state dict, given with ``--rank``/``--alpha``).

    Raises:
        InputNotFoundError: the file does not exist.
        InvalidInputError: ADAPTER is a folder (a PEFT adapter, which needs no --rank).
    """
    path = Path(adapter).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"ADAPTER {path} does not exist")
    if path.is_dir():
        raise InvalidInputError(
            f"ADAPTER {path} is a folder, but --rank/--alpha are for a loralib checkpoint file "
            "(.pt, .bin or .safetensors); for a PEFT adapter folder leave them out"
        )
    path = path.resolve()
    return AdapterFolder(folder=path.parent, config_path=None, weights_path=path)


def check_output_location(out: Path | str, inputs: list[Path], overwrite: bool) -> Path:
    """Return OUT as an absolute path after checking that it may be written.

    OUT may not exist as a file, may not be a non-empty folder unless
    ``overwrite``, and may neither lie inside an input nor contain one (so that
    ``--overwrite`` can never delete an input). Symlinks and relative paths are
    resolved before comparing.

    Raises:
        OutputError: when any of these rules is broken.
    """
    out_path = Path(out).expanduser()
    # Resolve the parent (following symlinks) but keep OUT's own name: OUT itself
    # may be a symlink the user wants replaced.
    resolved = out_path.absolute().parent.resolve() / out_path.name
    for folder in inputs:
        if _is_same_or_inside(resolved, folder):
            raise OutputError(
                f"OUT {out_path} lies inside the input folder {folder}; choose another OUT"
            )
        if _is_same_or_inside(folder, resolved):
            raise OutputError(
                f"OUT {out_path} contains the input folder {folder}; choose another OUT"
            )
    if resolved.is_symlink() or (resolved.exists() and not resolved.is_dir()):
        raise OutputError(
            f"OUT {out_path} exists and is not a folder; remove it or choose another OUT"
        )
    if resolved.is_dir() and any(resolved.iterdir()) and not overwrite:
        raise OutputError(f"OUT {out_path} exists and is not empty; pass --overwrite to replace it")
    return resolved


def _is_same_or_inside(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or lies inside it, comparing folders by identity.

    Spelled paths can differ for one folder: letter case on the case-insensitive
    filesystems of macOS and Windows, drive letters, ``\\\\?\\`` long-path
    prefixes, 8.3 short names, hard links. So each existing folder on the way
    from ``path`` up to the root is compared with ``folder`` by device and inode
    (``os.path.samestat``), not by its name. Spelled names still count, for
    parts of ``path`` that do not exist yet.
    """
    if path == folder or folder in path.parents:
        return True
    try:
        target = folder.stat()
    except OSError:
        return False
    for candidate in (path, *path.parents):
        try:
            if os.path.samestat(candidate.stat(), target):
                return True
        except OSError:
            continue  # not created yet, or unreadable: its name was compared above
    return False


def _existing_folder(path: Path | str, role: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputNotFoundError(f"{role} {folder} does not exist")
    if not folder.is_dir():
        raise InputNotFoundError(f"{role} {folder} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputNotFoundError(f"{role} {folder} cannot be read (permissions)")
    return folder.resolve()


def shards_from_index(
    index_path: Path, remote: Collection[str] = (), check_files: bool = True
) -> dict[str, set[str]]:
    """Shard file name -> the keys the index puts in it; names are checked, never trusted.

    Each shard must be in the index's folder, unless ``remote`` names it (on the Hub)
    or ``check_files`` is False.
    """
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInputError(f"{index_path} has no weight_map; the checkpoint is incomplete")
    shards: dict[str, set[str]] = {}
    for key, name in weight_map.items():
        if (
            not isinstance(name, str)
            or Path(name).name != name
            or name in ("", ".", "..")
            or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES
        ):
            raise InvalidInputError(
                f"{index_path} maps {key!r} to {name!r}, which is not a file name in BASE; "
                "refusing to follow paths read from the index"
            )
        shards.setdefault(name, set()).add(key)
    for name in shards:
        if check_files and name not in remote and not (index_path.parent / name).is_file():
            raise InputNotFoundError(
                f"shard {name} named in {index_path.name} is missing from {index_path.parent}; "
                "the download is incomplete"
            )
    return shards


def check_stays_inside(folder: Path, name: str) -> Path:
    """``folder / name``, after checking that following symlinks does not leave ``folder``.

    The one exception is the Hugging Face cache layout, where
    ``models--org--name/snapshots/<rev>/file`` links to ``models--org--name/blobs/<hash>``.

    Raises:
        InvalidInputError: the file resolves outside the folder.
    """
    path = folder / name
    target = path.resolve()
    if target.is_relative_to(folder):
        return path
    if folder.parent.name == "snapshots" and target.is_relative_to(folder.parent.parent / "blobs"):
        return path
    raise InvalidInputError(
        f"{path} is a link to {target}, outside {folder}; refusing to read files outside the "
        "model folder (copy the file in instead of linking it)"
    )
