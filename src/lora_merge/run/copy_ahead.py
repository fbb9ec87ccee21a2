"""Copy BASE's untouched tensors into OUT's shards while ``import torch`` runs.

Most of a merge's output can be bytes copied from BASE: every tensor the adapter
does not touch, when its dtype does not change (1.1B with q/v LoRA: 1.99 of its
2.2 GB). ``copy_file_range`` copies them in the kernel and lets go of the GIL, and
``import torch`` takes about 1.5 s on one core while the others wait: started
before the import, the copy runs on a core the import leaves idle. On 2 cores
with ``--no-hash-inputs`` that made a 1.1B q/v merge 13% faster; with the input
hashing, which fills that core already, no faster (docs/benchmarks.md).

A plain merge is planned from JSON and safetensors headers alone, without torch
(:func:`~lora_merge.plan.planner.build_merge_plan`, the run's own planner): here,
before ``import torch``, its plan gives the output's shards
(:func:`~lora_merge.plan.shards.shard_layout` with ``--max-shard-size``), each
shard's header (the inputs' labels and the arithmetic as its metadata,
:mod:`lora_merge.finish.shard_metadata`) and the tensors it copies byte for byte.
Each shard is written into a staging folder of OUT
(:mod:`lora_merge.finish.staging`): its header, then those tensors.

The run plans again, with its checked options, and trusts nothing made here.
When the run reaches a shard (:func:`lora_merge.run.shards.write_shards`) it
encodes the header from its plan and claims the copies (:meth:`CopiesAhead.claim`):
a shard whose header is not byte for byte the one planned here stops the copying
for good and is written whole, as without it; otherwise the run skips exactly
the tensors its own plan copies from the very bytes (file, offset, length) that
are copied here, writes the shard's other tensors meanwhile, and waits for the
copies before it moves on (:meth:`CopiesAhead.settle`; one that failed makes it
write the shard whole). Shards that the run does not write are removed before
OUT appears.

Nothing is copied ahead where the options or inputs leave the plain path (a
quantized BASE, whose formats import torch; a pickled adapter; ``--dtype``,
another ``--save-method``, several adapters or a combination, an adapter that
is not LoRA, ``--unmerge``, an initial state, ``--qlora-base``, ``--part``,
``--resume``, ``--low-disk``), nor when OUT's folder is missing, lies inside an
input, or its disk lacks room for the shards.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lora_merge.adapter.config import read_adapter_config
from lora_merge.adapter.keys import classify_adapter_keys
from lora_merge.adapter.weights import open_adapter_weights
from lora_merge.compute.arithmetic import merge_arithmetic
from lora_merge.errors import LoraMergeError, UsageError
from lora_merge.finish.shard_metadata import InputIdentity, shard_metadata_of
from lora_merge.finish.staging import staging_name
from lora_merge.inputs.resolve import resolve_adapter, resolve_base
from lora_merge.io.positional import PositionalFile
from lora_merge.io.read_pacing import ReadPacing
from lora_merge.io.shard_writer import encode_safetensors_header
from lora_merge.options.settings import MergeOptions
from lora_merge.options.values import SaveMethod, parse_size
from lora_merge.plan.planner import build_merge_plan
from lora_merge.plan.shards import shard_layout

# Free space left on OUT's disk after the copies, at least: the run checks the whole
# output's room itself, later; the copies must not be what fills the disk.
FREE_SPACE_MARGIN_BYTES = 2**30


class CopiedRange(NamedTuple):
    """Bytes copied from BASE: the file (resolved), the absolute offset and the length."""

    path: Path
    start: int
    nbytes: int


@dataclass
class ShardCopies:
    """One planned output shard: its header, and the tensors copied into it.

    Attributes:
        file_name: the shard's file name in OUT.
        header: its encoded header, as the shard writer would write it.
        planned: output tensor name -> the BASE bytes to copy there, and where in the
            shard they go.
        copied: the names whose bytes are in place (filled by the copying thread).
        done: set once the thread is finished with this shard (or stopped).
        claimed: the names the run skips, counting on the copies (:meth:`CopiesAhead.claim`).
    """

    file_name: str
    header: bytes
    planned: dict[str, tuple[CopiedRange, int]]
    copied: set[str] = field(default_factory=set)
    claimed: set[str] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)


class CopiesAhead:
    """Untouched tensors being copied into OUT's staging folder by one thread.

    A context manager: leaving it stops the thread and, unless the run's staging
    folder took the folder over (:meth:`hand_over`), deletes what was copied.

    Args:
        out: OUT, absolute, as the run resolves it.
        shards: the planned shards, in the order the run writes them.
        pacing: told which bytes of each BASE file were copied, so that the hashing
            of the inputs follows (see :mod:`lora_merge.io.read_pacing`); None: nobody follows.

    Attributes:
        folder: the staging folder it creates and copies into: named as the run's own
            (this process, a token of its own), so that the run can take it over.
        taken: the output tensors the run took from the copies instead of writing them.
    """

    def __init__(
        self, out: Path, shards: Sequence[ShardCopies], pacing: ReadPacing | None = None
    ) -> None:
        self._pacing = pacing
        self._reads: dict[Path, Callable[[int, int], None]] = {}
        # Where the copies of each file got to: see _report_read.
        self._copied_to: dict[Path, int] = {}
        self.folder = out.parent / staging_name(out, os.getpid(), uuid.uuid4().hex[:8])
        self._shards = {shard.file_name: shard for shard in shards}
        self._run_files: set[str] = set()
        self.taken: set[str] = set()
        self._handed_over = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy_all, name="lora-merge-copy-ahead")

    @property
    def shards(self) -> list[ShardCopies]:
        """The planned shards, in the order they are copied."""
        return list(self._shards.values())

    def __enter__(self) -> CopiesAhead:
        try:
            self.folder.mkdir()
        except OSError:
            return self  # never started, never handed over: the run writes every tensor
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop copying; delete the folder unless the run's staging folder took it over."""
        self._halt()
        if not self._handed_over:
            shutil.rmtree(self.folder, ignore_errors=True)

    def hand_over(self, out: Path) -> Path | None:
        """The folder, now OUT's staging folder's to keep or delete; None (and the copies
        deleted) when it is not a staging folder of ``out`` (the run resolved OUT otherwise)
        or the copying never started (outside a ``with`` block, or the folder could not
        be made)."""
        token = self.folder.name.rsplit("-", 1)[-1]
        started = self._thread.ident is not None
        if not started or self.folder != out.parent / staging_name(out, os.getpid(), token):
            self.close()
            return None
        self._handed_over = True
        return self.folder

    def claim(
        self, file_name: str, header: bytes, byte_copies: Mapping[str, CopiedRange]
    ) -> set[str]:
        """The tensors of shard ``file_name`` that the copies write, for the run to skip.

        The copying may still be under way: the run writes the shard's other tensors
        meanwhile (other byte ranges of the same file, under the same header), then
        calls :meth:`settle`.

        Args:
            file_name: the shard the run is about to write.
            header: its header, encoded from the run's plan.
            byte_copies: the tensors the run's plan copies byte for byte, and from where.

        Returns:
            The names of those whose very bytes (file, offset, length) are copied into
            the shard; none when the header is not the one planned here (the copying
            then stops for good: the run's plan differs, and it writes the shard whole),
            or when the run's staging folder did not take the copies over.
        """
        self._run_files.add(file_name)
        shard = self._shards.get(file_name)
        if not self._handed_over or shard is None or shard.header != header:
            self._halt()
            return set()
        shard.claimed = {
            name for name, (source, _) in shard.planned.items() if byte_copies.get(name) == source
        }
        return shard.claimed

    def settle(self, file_name: str) -> bool:
        """Wait until shard ``file_name``'s copies are done; False if one of those claimed
        failed (a full disk, an input gone), and the run must write the shard again."""
        shard = self._shards.get(file_name)
        if shard is None or not shard.claimed:
            return True
        shard.done.wait()
        if not shard.claimed <= shard.copied:
            return False
        self.taken |= shard.claimed
        return True

    def discard_unclaimed(self) -> None:
        """Stop copying and remove the shards the run did not write (another layout than planned here)."""
        self._halt()
        for file_name in self._shards.keys() - self._run_files:
            (self.folder / file_name).unlink(missing_ok=True)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _copy_all(self) -> None:
        """The thread: each shard's header, then its untouched tensors, until done or stopped."""
        sources: dict[Path, PositionalFile] = {}
        try:
            for shard in self._shards.values():
                if self._stop.is_set():
                    break
                self._copy_shard(shard, sources)
        except OSError:
            # A full disk, a file gone: what is not copied, the run writes itself (and
            # reports the error, if it is one, where it meets it).
            pass
        finally:
            for source in sources.values():
                source.close()
            for shard in self._shards.values():
                shard.done.set()

    def _report_read(self, source: CopiedRange, copied: int) -> None:
        """Tell the pacing of the input hashing what was copied, and the bytes skipped since
        the last copy of the file where they are no more than its lead.

        The copies run far ahead of the stream, while torch imports, and skip the tensors
        the stream merges. Counted as unread, a layer's few skipped tensors (q/v) would hold
        the hasher back until the stream reads them, after the copied pages are gone from
        a small page cache (measured: 1.1B q/v in a 1 GiB cgroup read 0.6-0.9 GB more from
        the disk than unpaced hashing). Read ahead by the hasher instead, they cost at most a
        second read by the stream. A wider gap (every weight of a layer, when the copies
        take only the norms) stays unread: the hasher waits for the stream there.
        """
        assert self._pacing is not None, "only called with a pacing"
        start = self._copied_to.get(source.path, 0)
        if source.start - start > self._pacing.lead_bytes:
            start = source.start
        self._reads[source.path](start, source.start + copied - start)
        self._copied_to[source.path] = source.start + copied

    def _copy_shard(self, shard: ShardCopies, sources: dict[Path, PositionalFile]) -> None:
        try:
            # Never truncated: the run may already be writing the shard's other tensors.
            with PositionalFile(
                self.folder / shard.file_name, writable=True, truncate=False
            ) as out:
                out.write_all(memoryview(shard.header), 0)
                for name, (source, offset) in shard.planned.items():
                    if self._stop.is_set():
                        return
                    if source.path not in sources:
                        sources[source.path] = PositionalFile(source.path)
                        if self._pacing is not None:
                            self._reads[source.path] = self._pacing.reads_of(
                                sources[source.path].descriptor
                            )
                    copied = sources[source.path].copy_to(out, source.nbytes, source.start, offset)
                    if source.path in self._reads:
                        self._report_read(source, copied)
                    if copied == source.nbytes:
                        # The disk writes the copy back while torch is imported, as the
                        # shard writer does for every finished tensor.
                        out.done_with(offset, copied)
                        shard.copied.add(name)
        finally:
            shard.done.set()


def copy_untouched_ahead(
    options: MergeOptions, pacing: ReadPacing | None = None
) -> CopiesAhead | None:
    """Plan a plain merge from JSON and headers, ready to copy the tensors its plan copies.

    Args:
        options: the merge's options, unchecked: a mistake is reported by the run itself.
        pacing: told what the copies read (the input files' hashing follows the reads).

    Returns:
        The copies, to start with ``with`` and hand to :func:`lora_merge.api.merge`;
        None where nothing is copied ahead (see the module docstring).
    """
    if not _plain_merge(options):
        return None
    try:
        return _planned_copies(options, pacing)
    except (
        OSError,
        ValueError,  # a size option
        LoraMergeError,  # what is wrong with the inputs, checked again and reported by the run
    ):
        return None


def _plain_merge(options: MergeOptions) -> bool:
    """Whether the options leave the output a plain merge's: BASE's tensors, dtypes and order."""
    try:
        save_method = SaveMethod.parse(options.save_method, "--save-method")
    except UsageError:
        return False
    return (
        save_method is SaveMethod.MERGED_16BIT
        and options.dtype == "auto"
        and not options.combines
        and not options.unmerge
        and options.initial_adapter is None
        and not options.residual_base
        and not options.recompute_initial
        and not options.qlora_base
        and options.rank is None
        and options.part is None
        and not options.resume
        and not options.low_disk
    )


def _planned_copies(options: MergeOptions, pacing: ReadPacing | None) -> CopiesAhead | None:
    """The plain merge's plan, made as the run makes it, and the copies of its byte copies."""
    given_base = Path(options.base).expanduser()
    given_adapter = Path(options.adapters[0]).expanduser()
    given_out = Path(options.out).expanduser()
    if not (given_base.is_dir() and given_adapter.is_dir() and given_out.parent.is_dir()):
        return None  # Hub ids are resolved by the run
    out = given_out.absolute().parent.resolve() / given_out.name
    base = resolve_base(given_base.resolve())
    adapter = resolve_adapter(given_adapter.resolve())
    if any(out.parent.is_relative_to(folder) for folder in (base.folder, adapter.folder)):
        return None  # the staging folder would appear inside an input
    if out.exists() and not options.overwrite:
        return None  # the run refuses it
    if base.quantization is not None or adapter.weights_path.suffix != ".safetensors":
        return None  # read with torch: a quantized base's formats, a pickled adapter
    assert adapter.config_path is not None, "resolve_adapter finds an adapter_config.json"
    config = read_adapter_config(adapter.config_path)
    if config.peft_type != "LORA":
        return None
    with closing(open_adapter_weights(adapter.weights_path)) as weights:
        contents = classify_adapter_keys(list(weights.keys()))
        plan = build_merge_plan(base, config, contents, weights, output_dtype=None)
    metadata = shard_metadata_of(
        InputIdentity.of("base", str(options.base), base.folder),
        InputIdentity.of("adapter", str(options.adapters[0]), adapter.folder),
        merge_arithmetic(any(p.magnitude_key for p in plan.lora_products)),
    )
    shards = []
    for file_name, tensors in shard_layout(plan.tensors, parse_size(options.max_shard_size)):
        header = encode_safetensors_header([t.spec for t in tensors], metadata)
        planned = {}
        offset = len(header)
        for tensor in tensors:
            if tensor.is_byte_copy and tensor.spec.nbytes:
                entry = base.entries[tensor.source_key]
                source = CopiedRange(entry.path.resolve(), entry.start, entry.nbytes)
                planned[tensor.spec.name] = (source, offset)
            offset += tensor.spec.nbytes
        shards.append(ShardCopies(file_name, header, planned))
    copied_bytes = sum(r.nbytes for s in shards for r, _ in s.planned.values())
    if shutil.disk_usage(out.parent).free < copied_bytes + FREE_SPACE_MARGIN_BYTES:
        return None
    return CopiesAhead(out, shards, pacing)
