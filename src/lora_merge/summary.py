"""What a merge did: :class:`MergeSummary`, returned by :func:`lora_merge.api.merge`.

The CLI prints it as one line, or as JSON with ``--json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did.

    Attributes:
        out: the folder written.
        tensors: output tensors written.
        lora_modules: LoRA modules merged.
        replaced: base tensors replaced by adapter tensors.
        copied: tensors copied byte for byte.
        shards: safetensors files in OUT.
        resumed_shards: shards kept from an interrupted run (``--resume``).
        bytes_written: tensor data bytes written.
        seconds: wall time of the merge.
        base / adapter: the resolved input folders.
        files: the files written to OUT.
        lora_modules_by_layer: LoRA modules merged, by layer kind.
        plan_seconds / write_seconds: time spent planning, and streaming and finishing OUT.
        warnings: what the run warned about (also issued as ``LoraMergeWarning``).
        pushed_to / commit_url: the Hub repo OUT was uploaded to and the commit, if pushed.
        adapters: every adapter combined (``adapter`` is the first), and
            ``combine`` the method, when several adapters (or combination options) were given.
        threads: CPU threads that merged at once.
        gb_per_second: tensor data written per second of the whole run, in GB (10^9 bytes).
    """

    out: str
    tensors: int
    lora_modules: int
    replaced: int
    copied: int
    shards: int
    resumed_shards: int
    bytes_written: int
    seconds: float
    base: str = ""
    adapter: str = ""
    files: list[str] = field(default_factory=list)
    lora_modules_by_layer: dict[str, int] = field(default_factory=dict)
    plan_seconds: float = 0.0
    write_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    pushed_to: str | None = None
    commit_url: str | None = None
    adapters: list[str] = field(default_factory=list)
    combine: str | None = None
    part: str | None = None
    computed_shards: int | None = None
    threads: int = 1
    gb_per_second: float = 0.0

    def to_dict(self) -> dict[str, object]:
        summary = asdict(self)
        if self.combine is None:  # a single-adapter merge keeps its documented fields
            del summary["adapters"], summary["combine"]
        for name in ("part", "computed_shards"):  # only runs of a split merge have them
            if summary[name] is None:
                del summary[name]
        return summary
