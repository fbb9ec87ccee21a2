"""Build the merge plan: every output tensor's name, dtype, shape, source and delta.

The plan is made from headers and adapter shapes only (no tensor data), so every
mismatch is reported before the first byte of OUT is written, and the writer
knows every shard's header in advance.

This is the loop: it matches adapter names to base tensors (:mod:`.names`),
plans replacements and the vocabulary (:mod:`.vocabulary`), asks the layer kinds
(:mod:`.kinds`) which one each LoRA module is and what it adds, and lists the
output tensors (:mod:`.model`) in the base's order.
"""

from __future__ import annotations

import dataclasses

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents, LoraModuleKeys
from lora_merge.adapter.loralib import LoralibSettings
from lora_merge.adapter.refusals import refuse_loralib_conv, refuse_unmerge_of_replacements
from lora_merge.dtypes import DType
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.plan.kinds.bias import (
    add_flagged_biases,
    bias_flag,
    bias_key_of,
    plan_lora_bias,
)
from lora_merge.plan.kinds.conv1d import plan_conv1d, stores_transposed
from lora_merge.plan.kinds.convolution import check_convolution, plan_convolution
from lora_merge.plan.kinds.dora import plan_dora
from lora_merge.plan.kinds.embedding import plan_embedding
from lora_merge.plan.kinds.experts import plan_parameter_loras
from lora_merge.plan.kinds.linear import plan_linear
from lora_merge.plan.kinds.merged_linear import plan_merged_linear
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import (
    Delta,
    LoraProduct,
    MergePlan,
    PlannedTensor,
    TokenRows,
)
from lora_merge.plan.names import BaseNames, check_every_name_matches
from lora_merge.plan.tuners.modules import plan_tuner_modules
from lora_merge.plan.vocabulary import (
    TiedHead,
    plan_replacements,
    plan_tied_head,
    plan_token_rows,
)

Deltas = dict[str, Delta]


def build_merge_plan(
    base: BaseCheckpoint,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
    output_dtype: DType | None,
    unmerge: bool = False,
    loralib: LoralibSettings | None = None,
) -> MergePlan:
    """Decide every output tensor. Reads shapes and dtypes only.

    Args:
        base: the base checkpoint's tensor locations and config.
        config: the adapter's config.
        contents: the adapter's keys, sorted by role.
        adapter: the adapter's tensors (only shapes and dtypes are looked at).
        output_dtype: dtype for every floating-point tensor, or None to keep each one's.
        unmerge: subtract every delta instead of adding it (the scales are negated;
            negation is exact, so ``W + (-s) * B @ A`` is ``W - s * B @ A`` bit for bit).
        loralib: set for a loralib checkpoint: every layer has this rank, and an A
            with a multiple of its rows is a MergedLinear.

    Raises:
        AdapterMismatchError: an adapter tensor matches no base tensor or does not fit it.
        InvalidInputError: ``unmerge`` with an adapter that replaces whole tensors, or a
            layer kind lora-merge does not merge (see :mod:`lora_merge.plan.kinds`).
    """
    if unmerge:
        refuse_unmerge_of_replacements(contents)
    tie = TiedHead.of(base)
    # base.tensors shows a quantized weight as one dequantized tensor, its parts hidden.
    base_names = BaseNames([*base.tensors, *tie.sources])
    parameter_deltas = plan_parameter_loras(base, base_names, config, contents, adapter)
    if loralib is not None:
        refuse_loralib_conv(contents, base_names.find)
    check_every_name_matches(base_names, contents, parameter_deltas.modules)
    shapes = _PlannedShapes(base, tie, adapter)
    replacements = plan_replacements(
        contents, adapter, base_names, shapes.base_shape, base.config.get("vocab_size"), tie
    )
    shapes.replacements = replacements.keys
    deltas: Deltas = dict(parameter_deltas.products)
    bias_flags = _plan_module_deltas(
        deltas, contents, parameter_deltas.modules, base_names, shapes, config, loralib
    )
    sign = -1.0 if unmerge else 1.0
    deltas = {key: dataclasses.replace(d, scale=sign * d.scale) for key, d in deltas.items()}
    # AdaLoRA, IA3, LoHa, LoKr (plan_tuner_modules says how each undoes itself for --unmerge).
    deltas.update(
        plan_tuner_modules(
            contents,
            base_names,
            shapes.of,
            base.tensors.__contains__,
            adapter,
            config,
            shapes.model_type,
            unmerge,
            lambda key: None if base.tensors[key].quantized else base.tensors[key].dtype,
        )
    )
    token_rows = plan_token_rows(contents, base_names, config, adapter, shapes.of)
    plan = MergePlan(
        vocab_size=replacements.vocab_size,
        lora_modules=len(contents.lora_modules) + len(contents.tuner_modules),
        replaced=len(replacements.keys),
    )
    for name in base.tensors:
        plan.tensors.append(_planned_tensor(name, shapes, deltas, token_rows, output_dtype))
    add_flagged_biases(plan, bias_flags, base, deltas, output_dtype)
    plan_tied_head(plan, tie, replacements.keys, deltas, token_rows, adapter, base, output_dtype)
    return plan


class _PlannedShapes:
    """The shape of each output tensor as planning goes.

    A base tensor's own shape, unless an adapter tensor replaces it (a resized
    vocabulary) or it is a bias the adapter adds; a tied head the base does not
    store has its embedding's.
    """

    def __init__(self, base: BaseCheckpoint, tie: TiedHead, adapter: TensorSource) -> None:
        self.base = base
        self.adapter = adapter
        self.model_type = base.config.get("model_type")
        self.tied_sources = tie.sources
        self.replacements: dict[str, str] = {}
        self.added: dict[str, tuple[int, ...]] = {}

    def base_shape(self, base_key: str) -> tuple[int, ...]:
        """The shape the base gives ``base_key`` (a tied head: its embedding's)."""
        return self.base.tensors[self.tied_sources.get(base_key, base_key)].shape

    def of(self, base_key: str) -> tuple[int, ...]:
        """The shape ``base_key`` has in the output, as planned so far."""
        if base_key in self.added:
            return self.added[base_key]
        key = self.replacements.get(base_key)
        return self.adapter.shape(key) if key is not None else self.base_shape(base_key)


def _plan_module_deltas(
    deltas: Deltas,
    contents: AdapterContents,
    parameter_modules: set[str],
    base_names: BaseNames,
    shapes: _PlannedShapes,
    config: LoraAdapterConfig,
    loralib: LoralibSettings | None,
) -> list[str]:
    """Add to ``deltas`` each LoRA module's product, and its bias's (parameter LoRAs aside).

    Returns:
        The config flags that give the base the biases it lacks, in the order first needed.
    """
    bias_flags: list[str] = []
    for module in contents.lora_modules.values():
        if module.module in parameter_modules:
            continue
        weight_key = base_names.locate(f"{module.module}.weight", module.a_key or module.module)
        deltas[weight_key] = _plan_lora_module(
            module, weight_key, shapes.of(weight_key), shapes, config, loralib
        )
        if module.bias_key is None:
            continue
        bias_key = bias_key_of(weight_key)
        if bias_key not in shapes.base.tensors:
            flag = bias_flag(module, weight_key, shapes.model_type)
            if flag not in bias_flags:
                bias_flags.append(flag)
            shapes.added[bias_key] = (shapes.of(weight_key)[0],)
        deltas[bias_key] = plan_lora_bias(
            module, bias_key, shapes.of(bias_key), shapes.adapter, config
        )
    return bias_flags


def _plan_lora_module(
    module: LoraModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    shapes: _PlannedShapes,
    config: LoraAdapterConfig,
    loralib: LoralibSettings | None,
) -> LoraProduct:
    """Ask the layer kinds which one the module is, and plan its product.

    Raises:
        AdapterMismatchError: its factors fit no kind on this weight.
        InvalidInputError: it is a kind lora-merge does not merge.
    """
    adapter, model_type = shapes.adapter, shapes.model_type
    assert module.a_key is not None and module.b_key is not None
    lora = LoraShapes(
        module, adapter.shape(module.a_key), adapter.shape(module.b_key), weight_key, weight_shape
    )
    if loralib is not None and lora.a_shape[0] != loralib.rank:
        return plan_merged_linear(lora, loralib, model_type)
    lora.check_factors()
    is_convolution = len(lora.a_shape) > 2
    if is_convolution:  # first: a grouped convolution's B has r / groups columns
        check_convolution(lora)
    scale = config.scale_for(module.module, lora.checked_rank())
    if is_convolution:
        product = plan_convolution(lora, scale)
    elif module.is_embedding:
        product = plan_embedding(lora, scale)
    elif stores_transposed(lora, config, model_type):
        product = plan_conv1d(lora, scale)
    else:
        product = plan_linear(lora, scale)
    return product if module.magnitude_key is None else plan_dora(product, lora, adapter)


def _planned_tensor(
    name: str,
    shapes: _PlannedShapes,
    deltas: Deltas,
    token_rows: dict[str, TokenRows],
    output_dtype: DType | None,
) -> PlannedTensor:
    """The output tensor for the base tensor ``name``."""
    entry = shapes.base.tensors[name]
    replacement = shapes.replacements.get(name)
    source_dtype = shapes.adapter.dtype(replacement) if replacement else entry.dtype
    dtype = entry.dtype
    if output_dtype is not None and entry.dtype.is_floating_point:
        dtype = output_dtype
    return PlannedTensor(
        spec=TensorSpec(name=name, dtype=dtype, shape=shapes.of(name)),
        source="adapter" if replacement else "base",
        source_key=replacement or name,
        source_dtype=source_dtype,
        delta=deltas.get(name),
        dequantized=entry.quantized is not None and not replacement,
        dequantized_in_chunks=(
            entry.quantized is not None and entry.quantized.reads_in_chunks and not replacement
        ),
        token_rows=token_rows.get(name),
    )
