"""The one check of a merge's options: :class:`MergeOptions` in, :class:`MergeSettings` out.

:func:`checked_options` parses every value (:mod:`lora_merge.options.values`),
builds the combination recipe and the loralib settings, and refuses every
conflict between options as a usage error (exit 2), before any input is read
or downloaded and before OUT is touched. No other room checks the user's options.
"""

from __future__ import annotations

from lora_merge.adapter.initialisation import initial_state_mode, refuse_with_initial_state
from lora_merge.adapter.loralib import loralib_settings
from lora_merge.adapter.recipe import build_combine_recipe
from lora_merge.errors import UsageError
from lora_merge.io.cpus import usable_cpu_count
from lora_merge.options.settings import MergeOptions, MergeSettings
from lora_merge.options.values import (
    DTYPE_ALIASES,
    OutputDtype,
    Part,
    QuantType,
    SaveMethod,
    parse_part,
    parse_size,
    parse_threads,
    resolve_device,
)


def checked_options(options: MergeOptions) -> MergeSettings:
    """Parse and check ``options``: the one place a merge's options are read.

    The CLI (through :func:`lora_merge.merge`) and Python callers both start here,
    before any input is read or downloaded and before OUT is touched: a mistake
    costs nothing, and a value means the same from either (``quant_type="NF4"``
    is ``nf4``).

    Raises:
        UsageError: a value that is not one of its choices or out of range, or
            options that contradict each other or would be silently ignored.
    """
    adapters = tuple(options.adapters)
    if not adapters:
        raise UsageError("give at least one ADAPTER")
    output_dtype = OutputDtype.parse(options.dtype, "--dtype", DTYPE_ALIASES).dtype
    device = resolve_device(options.device)
    _check_four_bit_blocksize(options.quant_blocksize)
    settings = MergeSettings(
        base=options.base,
        adapters=adapters,
        out=options.out,
        output_dtype=output_dtype,
        max_shard_size=parse_size(options.max_shard_size, "--max-shard-size"),
        max_memory=parse_size(options.max_memory, "--max-memory"),
        device=device,
        save_method=SaveMethod.parse(options.save_method, "--save-method"),
        quant_type=QuantType.parse(options.quant_type, "--quant-type"),
        double_quant=options.double_quant,
        quant_blocksize=options.quant_blocksize,
        loralib=loralib_settings(options.rank, options.alpha, options.enable_lora),
        recipe=build_combine_recipe(
            len(options.adapters),
            combine=options.combine,
            weights=options.weights,
            density=options.density,
            majority_sign_method=options.majority_sign_method,
            svd_rank=options.svd_rank,
            svd_clamp=options.svd_clamp,
            seed=options.seed,
        )
        if options.combines
        else None,  # one adapter, merged as it is
        unmerge=options.unmerge,
        overwrite=options.overwrite,
        quiet=options.quiet,
        resume=options.resume,
        allow_nonfinite=options.allow_nonfinite,
        verify=options.verify,
        hash_inputs=options.hash_inputs,
        push_to_hub=options.push_to_hub,
        private=options.private,
        hub_revision=options.hub_revision,
        command=options.command,
        low_disk=options.low_disk,
        part=parse_part(options.part),
        initial_state=initial_state_mode(
            options.initial_adapter, options.residual_base, options.recompute_initial
        ),
        initial_adapter=options.initial_adapter,
        qlora_base=options.qlora_base,
        threads=parse_threads(options.threads) or usable_cpu_count(),
    )
    _refuse_conflicts(settings)
    return settings


def _check_four_bit_blocksize(blocksize: int) -> None:
    """Refuse a ``quant_blocksize`` bitsandbytes does not quantize with.

    Raises:
        UsageError: it is not one of the 4-bit format's block sizes.
    """
    from lora_merge.compute.dequantize import FOUR_BIT_BLOCKSIZES  # imports torch

    if blocksize not in FOUR_BIT_BLOCKSIZES:
        raise UsageError(
            f"quant_blocksize {blocksize!r} is not one of "
            f"{', '.join(map(str, FOUR_BIT_BLOCKSIZES))} (the block sizes bitsandbytes quantizes with)"
        )


def _refuse_conflicts(settings: MergeSettings) -> None:
    """Options that contradict each other, or that the run would ignore without saying so.

    Raises:
        UsageError: the first conflict found.
    """
    one_adapter_only = settings.loralib is not None or settings.unmerge
    if settings.recipe is not None and one_adapter_only:
        raise UsageError(
            "--unmerge and loralib checkpoints (--rank/--alpha) take one adapter and no "
            "--combine options; combine the adapters first, then unmerge the combination"
        )
    lora = settings.save_method is SaveMethod.LORA
    if lora:
        _refuse_with_adapter_output(settings, one_adapter_only)
    refuse_with_part(settings.part, lora, settings.push_to_hub, settings.low_disk)
    if settings.double_quant and not (
        settings.save_method is SaveMethod.MERGED_4BIT or settings.qlora_base
    ):
        raise UsageError(
            "--double-quant applies only with --save-method merged_4bit or --qlora-base"
        )
    refuse_with_initial_state(
        settings.initial_state, settings.recipe is not None, settings.loralib is not None or lora
    )
    if settings.qlora_base and settings.save_method is not SaveMethod.MERGED_16BIT:
        raise UsageError(
            "--qlora-base merges into the weights QLoRA training saw; it applies only with "
            "--save-method merged_16bit"
        )
    check_hub_options(
        settings.push_to_hub,
        private=settings.private,
        revision=settings.hub_revision,
        low_disk=settings.low_disk,
        verify=settings.verify,
        adapter_output=lora,
    )


def _refuse_with_adapter_output(settings: MergeSettings, one_adapter_only: bool) -> None:
    """``--save-method lora`` writes one PEFT adapter as it is: refuse what it cannot honour."""
    if settings.recipe is not None:
        raise UsageError(
            "--save-method lora writes one adapter as it is; it cannot be combined with "
            "several adapters or --combine options (merge them into a model instead)"
        )
    if one_adapter_only:
        raise UsageError(
            "--save-method lora writes a PEFT adapter as it is; it cannot be used with "
            "--unmerge or a loralib checkpoint (--rank/--alpha)"
        )
    ignored = [
        name
        for name, given in (
            ("--dtype", settings.output_dtype is not None),
            ("--verify", settings.verify),
            ("--allow-nonfinite", settings.allow_nonfinite),
        )
        if given
    ]
    if ignored:
        raise UsageError(
            f"{' and '.join(ignored)} apply to a merged model; --save-method lora writes "
            "the adapter's tensors as they are: leave them out"
        )


def refuse_with_part(
    part: Part | None, writes_adapter: bool, push_to_hub: str | None, low_disk: bool = False
) -> None:
    """``--part`` writes shards of a merged model for the final step to finish: refuse the rest.

    With ``--push-to-hub REPO --low-disk`` a part uploads its shards to REPO's
    staging branch instead (:mod:`lora_merge.finish.hub_parts`).

    Raises:
        UsageError: ``--part`` with ``--save-method lora``, or ``--push-to-hub``
            without ``--low-disk``.
    """
    if part is None:
        return
    if writes_adapter:
        raise UsageError(
            "--part splits a merged model's shards; --save-method lora writes one adapter file"
        )
    if push_to_hub is not None and not low_disk:
        raise UsageError(
            "--part with --push-to-hub needs --low-disk (each part uploads its own shards "
            "to the repo's staging branch); or write the parts into a shared folder and give "
            "--push-to-hub to the final step only (the same command without --part, with --resume)"
        )


def check_hub_options(
    push_to_hub: str | None,
    *,
    private: bool,
    revision: str | None,
    low_disk: bool,
    verify: bool,
    adapter_output: bool,
) -> None:
    """Refuse Hub options that cannot work together, before anything is read.

    Args:
        push_to_hub: the ``--push-to-hub`` repo id, or None.
        private / revision: ``--private`` and ``--revision``, which need a repo.
        low_disk: ``--low-disk``, which needs a repo and deletes each shard once uploaded.
        verify / adapter_output: ``--verify`` and ``--save-method lora``, which need
            the shards kept.

    Raises:
        UsageError: the first conflict found, or a repo id the Hub would refuse.
    """
    if push_to_hub is None:
        if low_disk:
            raise UsageError(
                "--low-disk uploads each shard as it is written and deletes it: it needs "
                "--push-to-hub REPO (without it, OUT must hold the whole model)"
            )
        if private or revision is not None:
            raise UsageError("--private and --revision only apply with --push-to-hub")
        return
    check_push_target(push_to_hub)
    for flag, given in (("--verify", verify), ("--save-method lora", adapter_output)):
        if low_disk and given:
            raise UsageError(
                f"{flag} cannot be used with --low-disk, which uploads and deletes "
                "each model shard as soon as it is written; drop one of them"
            )


def check_push_target(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, and a push that cannot happen offline.

    huggingface_hub is imported here, not at the top: only a run with --push-to-hub
    needs it, and it costs about 0.3 s to import.

    Raises:
        UsageError: ``repo_id`` is not ``org/name`` (or ``name``), or HF_HUB_OFFLINE is set.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(
            f"--push-to-hub {repo_id!r} is not a Hub repo id: use org/name or name ({err})"
        ) from err
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            "--push-to-hub needs the network but HF_HUB_OFFLINE is set; unset it or drop --push-to-hub"
        )
