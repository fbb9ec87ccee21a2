"""What a caller writes (:class:`MergeOptions`) and what the run reads (:class:`MergeSettings`).

:class:`MergeOptions` is what the CLI builds from the command line and what a
Python caller writes: text and numbers as typed.
:func:`lora_merge.options.checks.checked_options` turns it, once and before any
input is read, into :class:`MergeSettings`, whose every value is parsed
(:mod:`lora_merge.options.values`). Everything after the check reads the
settings, never the options, so the CLI and the Python API accept and refuse
exactly the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_merge.adapter.initialisation import InitialStateMode
from lora_merge.adapter.loralib import LoralibSettings
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.dtypes import DType
from lora_merge.options.values import Part, QuantType, SaveMethod

# torch is imported where a value needs it: --help, --version and usage errors need none.
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeOptions:
    """Everything one merge needs, as a caller writes it; the CLI builds one, Python callers may too.

    Attributes:
        base: folder of the base model (safetensors shards, config.json).
        adapter: folder of the PEFT LoRA adapter, or a sequence of several adapter
            folders to combine into one model (see ``combine``).
        out: folder to create with the merged model.
        dtype: ``auto`` (keep each tensor's dtype) or bf16 / fp16 / fp32.
        max_shard_size: largest output shard, in bytes or as ``5GB``-style text.
        max_memory: working-set budget for tensor data; big tensors are merged
            in row chunks that fit in it.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where the merge math runs.
        threads: CPU threads that merge at once; None: the CPUs this process may use
            (its affinity mask, capped by its cgroup's CPU quota).
        overwrite: replace an existing non-empty OUT.
        quiet: no progress bar.
        resume: keep a checksummed journal so an interrupted run can be resumed,
            and resume an interrupted ``resume`` run of the same merge.
        allow_nonfinite: write NaN/Inf produced by the merge instead of refusing.
        verify: reopen the written shards and check them before OUT appears.
        hash_inputs: record the sha256 of every input file in OUT's model card.
        push_to_hub: a Hub repo id to upload OUT to once it is complete.
        private: create that repo private (when it does not exist yet).
        hub_revision: the branch of that repo to commit to (created if needed).
        low_disk: with ``push_to_hub``, upload each shard as written, then delete it;
            a Hub BASE is read by range requests (see :mod:`lora_merge.finish.hub_upload`).
        command: the command line, recorded in the model card (None from Python).
        combine: how several adapters are combined (``cat`` by default; see the
            README's table of methods). Setting it, or ``weights``, with one
            adapter merges that adapter through the same path.
        weights: one weight per adapter, as ``"0.7,0.3"`` or a sequence (default 1.0 each).
        density: fraction of values kept by the ties, dare and magnitude_prune methods.
        majority_sign_method: TIES sign election, ``total`` (default) or ``frequency``.
        svd_rank: rank of an ``*_svd`` combination (default: the largest adapter rank).
        svd_clamp: quantile in (0, 1] at which ``*_svd`` factors are clamped.
        seed: seed of the dare methods' random masks (default 0).
        save_method: ``merged_16bit`` (a plain model; a quantized base is
            dequantized), ``merged_4bit`` (re-quantized with bitsandbytes, rounding
            twice), ``merged_native`` (re-quantized in BASE's own format: FP8 block,
            compressed-tensors FP8 per channel, MXFP4; for bitsandbytes, ``merged_4bit``)
            or ``lora`` (only the adapter, normalized).
        quant_type / double_quant / quant_blocksize: the 4-bit format for
            ``merged_4bit`` from an unquantized base (a 4-bit base's own format wins).
        unmerge: subtract the adapter (``W - scale * B @ A``): a merged model -> its base.
        rank / alpha: for a loralib (microsoft/LoRA) checkpoint file, which records
            neither; ADAPTER is then that file.
        enable_lora: loralib MergedLinear's ``enable_lora``, e.g. ``"1,0,1"``.
        part: ``"I/N"``: write only output shards ``k % N == I`` (:class:`~lora_merge.options.values.Part`).
        initial_adapter: the adapter as it was initialised (PiSSA, OLoRA, CorDA, LoRA-GA):
            ``scale * (B @ A - B0 @ A0)`` is merged (see :mod:`lora_merge.adapter.initialisation`).
        residual_base: BASE is what such an adapter was trained against (the residual
            model, or LoftQ's backbone): merge it plainly.
        recompute_initial: recompute ``B0 @ A0`` from BASE (``"pissa"``: SVD; ``"olora"``: QR).
        qlora_base: merge into ``dequant(quant(W))`` of a 16-bit BASE, quantized as QLoRA
            training saw it (``quant_type``, ``double_quant``, ``quant_blocksize``, or the
            format BASE's config.json records).
    """

    base: Path | str
    adapter: Path | str | Sequence[Path | str]
    out: Path | str
    dtype: str = "auto"
    max_shard_size: int | str = "5GB"
    max_memory: int | str = "1GiB"
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False
    resume: bool = False
    allow_nonfinite: bool = False
    verify: bool = False
    hash_inputs: bool = True
    push_to_hub: str | None = None
    private: bool = False
    hub_revision: str | None = None
    low_disk: bool = False
    command: str | None = None
    combine: str | None = None
    weights: str | Sequence[float] | None = None
    density: float | None = None
    majority_sign_method: str | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int | None = None
    save_method: str = "merged_16bit"
    quant_type: str = "nf4"
    double_quant: bool = False
    quant_blocksize: int = 64
    unmerge: bool = False
    rank: int | None = None
    alpha: float | None = None
    enable_lora: str | None = None
    part: str | None = None
    initial_adapter: Path | str | None = None
    residual_base: bool = False
    recompute_initial: bool = False
    qlora_base: bool = False

    @property
    def adapters(self) -> list[Path | str]:
        """The adapter(s), as a list."""
        if isinstance(self.adapter, Path | str):
            return [self.adapter]
        return list(self.adapter)

    @property
    def combines(self) -> bool:
        """Several adapters, or combination options: the adapters go through a combination
        (one adapter with combination options is merged through the same path)."""
        return len(self.adapters) > 1 or any(
            value is not None
            for value in (
                self.combine,
                self.weights,
                self.density,
                self.majority_sign_method,
                self.svd_rank,
                self.svd_clamp,
                self.seed,
            )
        )


@dataclass(frozen=True)
class MergeSettings:
    """One merge's options, checked and parsed: what every step after the check reads.

    Built only by :func:`checked_options`. Paths stay as the caller wrote them
    (they may be Hub repo ids, and the model card records them as given).

    Attributes:
        base / adapters / out: the inputs and OUT, as given; ``adapters`` has one or more.
        output_dtype: the dtype of every floating-point output tensor; None keeps each one's.
        max_shard_size / max_memory: byte counts.
        device: where the merge math runs (``auto`` resolved).
        threads: CPU threads that merge at once (the default resolved, see
            :func:`lora_merge.io.cpus.usable_cpu_count`).
        save_method / quant_type / double_quant / quant_blocksize: what OUT holds,
            and the 4-bit format of ``merged_4bit`` from a 16-bit base.
        recipe: how the adapters are combined; None merges one adapter as it is.
        loralib: rank, alpha and groups of a loralib checkpoint; None for PEFT adapters.
        unmerge: subtract the adapter instead of adding it.
        overwrite / quiet / resume / allow_nonfinite / verify / hash_inputs /
            push_to_hub / private / hub_revision / command / part: as in :class:`MergeOptions`.
        initial_state: how an adapter whose initialisation changed the base is merged.
        initial_adapter: the folder of ``--initial-adapter``, as given, or None.
        qlora_base: merge into a simulated QLoRA base (``dequant(quant(W))``).
    """

    base: Path | str
    adapters: tuple[Path | str, ...]
    out: Path | str
    output_dtype: DType | None
    max_shard_size: int
    max_memory: int
    device: torch.device
    save_method: SaveMethod
    quant_type: QuantType
    double_quant: bool
    quant_blocksize: int
    recipe: CombineRecipe | None
    loralib: LoralibSettings | None
    unmerge: bool
    overwrite: bool
    quiet: bool
    resume: bool
    allow_nonfinite: bool
    verify: bool
    hash_inputs: bool
    push_to_hub: str | None
    private: bool
    hub_revision: str | None
    command: str | None
    low_disk: bool = False
    part: Part | None = None
    initial_state: InitialStateMode = InitialStateMode.AS_TRAINED
    initial_adapter: Path | str | None = None
    qlora_base: bool = False
    threads: int = 1
