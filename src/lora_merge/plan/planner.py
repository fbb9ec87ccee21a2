"""Build the merge plan: every output tensor's name, dtype, shape, source and delta.

The plan is made from headers and adapter shapes only (no tensor data), so every
mismatch is reported before the first byte of OUT is written, and the writer
knows every shard's header in advance.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents, LoraModuleKeys
from lora_merge.adapter.loralib import LoralibSettings
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.plan.architectures import (
    INPUT_EMBEDDING_SUFFIXES,
    TIED_HEAD_NAME,
    VOCAB_TENSOR_SUFFIXES,
    bias_flag_for,
    is_conv1d_module,
)
from lora_merge.plan.experts import (
    PER_EXPERT_LAYOUTS,
    declared_expert_count,
    expert_targets,
    match_expert_target,
    owner_module,
)
from lora_merge.plan.four_bit_format import FourBitFormat

# "zeros": a tensor the base lacks and that starts at zero (a bias the adapter adds).
SourceName = Literal["base", "adapter", "zeros"]
# Unmatched adapter keys an error message lists (the rest are counted).
MAX_KEYS_IN_ERROR = 3


@dataclass(frozen=True)
class LoraProduct:
    """``scale * B @ A`` to add to a weight, possibly transposed.

    Attributes:
        a_key / b_key: adapter keys of A (r, in) and B (out, r).
        scale: alpha / r (or alpha / sqrt(r) for rsLoRA).
        transposed: the stored weight is ``(B @ A).T``-shaped: GPT-2 Conv1D
            (fan_in_fan_out) and embeddings (``lora_embedding_A`` is (r, vocab)).
            Convolutions are never transposed: A and B are flattened to 2-D and
            each output channel is one row of the weight viewed as (out, -1).
        layer: the kind of layer, for reports: "linear", "conv1d" (transformers'
            Conv1D), "convolution" (``nn.Conv1d/2d/3d``), "embedding", "experts" or
            "merged_linear" (loralib), prefixed
            with "dora-" for DoRA modules.
        dense: ``a_key`` is the whole delta in ``B @ A``'s (out, in) layout and
            ``b_key`` is not read (a combination kept at full rank).
        magnitude_key: DoRA's magnitude vector m (one value per output feature):
            the result is ``m / ||V|| * V`` with ``V = W + scale * B @ A`` and the
            norm taken per output feature (a row of the stored weight, or a column
            when ``transposed``).
        experts: E when A and B hold the LoRAs of E experts (PEFT ``target_parameters``,
            see :mod:`lora_merge.plan.experts`); 1 otherwise.
        expert: with ``experts > 1``, the one expert whose 2-D weight this is (per-expert
            storage); None when the weight is the fused (E, X, Y) tensor.
        b_rows: the rows of the expert's B that this weight takes (a part of a fused
            ``gate_up_proj`` stored as separate gate and up tensors), or None for all.
        groups: loralib ``MergedLinear``'s ``enable_lora``: the weight's output rows are
            ``len(groups)`` equal groups and B holds the enabled ones' rows, each group
            with its own r rows of A (see :mod:`lora_merge.adapter.loralib`); None otherwise.
    """

    a_key: str
    b_key: str
    scale: float
    transposed: bool
    layer: str = "linear"
    dense: bool = False
    magnitude_key: str | None = None
    experts: int = 1
    expert: int | None = None
    b_rows: tuple[int, int] | None = None
    groups: tuple[bool, ...] | None = None

    @property
    def norm_per_column(self) -> bool:
        """DoRA's norm spans every row of the stored weight, so it needs a first pass."""
        return self.magnitude_key is not None and self.transposed


@dataclass(frozen=True)
class LoraBias:
    """``scale * b`` to add to a bias (PEFT ``lora_bias=True``: ``lora_B.bias``)."""

    bias_key: str
    scale: float


@dataclass(frozen=True)
class TokenRows:
    """Rows of an embedding replaced wholesale (PEFT trainable tokens).

    PEFT's ``TrainableTokensLayer.merge``: ``W.index_copy(0, indices, delta.to(W))``,
    so row ``indices[i]`` becomes row ``i`` of the adapter's tensor, cast once.

    Attributes:
        key: adapter key of ``trainable_tokens_delta`` (n, dim).
        indices: the n row numbers, from ``trainable_token_indices``.
    """

    key: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how to produce it.

    Attributes:
        spec: output name, dtype and shape.
        source: where the starting values are read: the base, a full tensor
            in the adapter that replaces the base's, or zeros (a bias the base lacks).
        source_key: the key in that source.
        source_dtype: dtype of the starting values as read (a quantized weight's
            dequantized dtype).
        delta: what to add, if anything.
        token_rows: rows replaced last, if any (trainable tokens).
        dequantized: the base stores this weight quantized (bitsandbytes); reading
            it dequantizes, so it is never a byte copy.
        requantize: write the merged weight 4-bit in this format (``spec`` is then
            the packed codes); ``--save-method merged_4bit``.
        written_with: this tensor is part of the 4-bit group of that weight and is
            written with it (absmax, quant map, quant state).
    """

    spec: TensorSpec
    source: SourceName
    source_key: str
    source_dtype: torch.dtype
    delta: LoraProduct | LoraBias | None = None
    token_rows: TokenRows | None = None
    dequantized: bool = False
    requantize: FourBitFormat | None = None
    written_with: str | None = None

    @property
    def is_byte_copy(self) -> bool:
        """Untouched, stored as is and same dtype: copy the stored bytes, never decode them."""
        return (
            self.source == "base"
            and self.delta is None
            and self.token_rows is None
            and not self.dequantized
            and self.requantize is None
            and self.written_with is None
            and self.source_dtype == self.spec.dtype
        )


@dataclass
class MergePlan:
    """The whole merge, decided up front.

    Attributes:
        tensors: output tensors in write order (the base's file order).
        vocab_size: the new vocabulary size when the adapter resized the embeddings.
        lora_modules: number of LoRA modules merged.
        replaced: number of base tensors replaced by adapter tensors.
        config_updates: config.json fields the output needs changed (a bias flag
            switched on, embeddings untied).
    """

    tensors: list[PlannedTensor] = field(default_factory=list)
    vocab_size: int | None = None
    lora_modules: int = 0
    replaced: int = 0
    config_updates: dict[str, object] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)

    @property
    def lora_products(self) -> list[LoraProduct]:
        """The LoRA products the plan adds, one per merged weight."""
        return [t.delta for t in self.tensors if isinstance(t.delta, LoraProduct)]

    @property
    def copied(self) -> int:
        """Tensors copied byte for byte from the base."""
        return sum(t.is_byte_copy for t in self.tensors)

    @property
    def module_products(self) -> list[LoraProduct]:
        """One product per adapter module (its A), for reports.

        A module may feed several weights: an MoE LoRA one per expert tensor of a
        per-expert checkpoint.
        """
        return list({p.a_key: p for p in reversed(self.lora_products)}.values())[::-1]

    @property
    def lora_modules_by_layer(self) -> dict[str, int]:
        """LoRA modules merged, counted by layer kind (linear, conv1d, embedding, experts, ...)."""
        return dict(Counter(p.layer for p in self.module_products))


def build_merge_plan(
    base: BaseCheckpoint,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
    output_dtype: torch.dtype | None,
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
        InvalidInputError: ``unmerge`` with an adapter that replaces whole tensors.
    """
    if unmerge:
        _refuse_unmerge(contents)
    sign = -1.0 if unmerge else 1.0
    base_tensors = base.tensors  # quantized weights appear dequantized; their parts are hidden
    tied_embedding = tied_input_embedding(base)
    head_stored = TIED_HEAD_NAME in base_tensors
    # A tied head is usually absent from the base; adapter keys may still target it.
    tied_sources = {TIED_HEAD_NAME: tied_embedding} if tied_embedding and not head_stored else {}
    base_names = BaseNames([*base_tensors, *tied_sources])
    parameter_deltas = _plan_parameter_loras(base, base_names, config, contents, adapter)
    if loralib is not None:
        _refuse_loralib_conv(base_names, contents)
    _check_every_name_matches(base_names, contents, parameter_deltas.modules)
    vocab_size = base.config.get("vocab_size")
    model_type = base.config.get("model_type")

    def base_shape_of(base_key: str) -> tuple[int, ...]:
        return base_tensors[tied_sources.get(base_key, base_key)].shape

    replacements: dict[str, str] = {}
    shared_copies: set[str] = set()
    new_vocab_size: int | None = None
    for adapter_name, adapter_key in contents.replacements.items():
        base_key = base_names.locate(adapter_name, adapter_key)
        base_shape = base_shape_of(base_key)
        shape = adapter.shape(adapter_key)
        if shape != base_shape:
            resized = _resized_vocabulary(base_key, base_shape, shape, vocab_size)
            if resized is None:
                raise _shape_mismatch(adapter_key, shape, base_key, base_shape)
            if new_vocab_size not in (None, resized):
                raise AdapterMismatchError(
                    f"the adapter resizes the vocabulary to both {new_vocab_size} and {resized} rows; "
                    "the embedding and lm_head must agree"
                )
            new_vocab_size = resized
        replacements[base_key] = adapter_key
        if adapter_name in contents.base_layer_copies:
            shared_copies.add(base_key)
    if tied_embedding is not None:
        _share_tied_base_layer(replacements, shared_copies, tied_embedding)

    shapes_of_added: dict[str, tuple[int, ...]] = {}

    def shape_of(base_key: str) -> tuple[int, ...]:
        if base_key in shapes_of_added:
            return shapes_of_added[base_key]
        key = replacements.get(base_key)
        return adapter.shape(key) if key is not None else base_shape_of(base_key)

    deltas: dict[str, LoraProduct | LoraBias] = {
        key: dataclasses.replace(product, scale=sign * product.scale)
        for key, product in parameter_deltas.products.items()
    }
    added_biases: list[tuple[str, str]] = []  # (bias name, config flag that gives it)
    for module in contents.lora_modules.values():
        if module.module in parameter_deltas.modules:
            continue
        weight_key = base_names.locate(f"{module.module}.weight", module.a_key or module.module)
        a_rows = adapter.shape(module.a_key or "")[0]
        if loralib is not None and a_rows != loralib.rank:
            product = _plan_merged_linear(
                module, weight_key, shape_of(weight_key), adapter, loralib, model_type
            )
        else:
            product = _plan_lora_product(
                module, weight_key, shape_of(weight_key), adapter, config, model_type
            )
        deltas[weight_key] = dataclasses.replace(product, scale=sign * product.scale)
        if module.bias_key is not None:
            bias_key = weight_key.removesuffix("weight") + "bias"
            if bias_key not in base_tensors:
                added_biases.append(_added_bias(module, bias_key, weight_key, model_type))
                shapes_of_added[bias_key] = (shape_of(weight_key)[0],)
            if adapter.shape(module.bias_key) != shape_of(bias_key):
                raise _shape_mismatch(
                    module.bias_key, adapter.shape(module.bias_key), bias_key, shape_of(bias_key)
                )
            rank = adapter.shape(module.a_key or "")[0]
            deltas[bias_key] = LoraBias(
                module.bias_key, sign * config.scale_for(module.module, rank)
            )

    token_rows: dict[str, TokenRows] = {}
    for module_name, key in contents.trainable_tokens.items():
        embedding_key = base_names.locate(f"{module_name}.weight", key)
        token_rows[embedding_key] = _plan_token_rows(
            module_name, key, config, adapter, shape_of(embedding_key)
        )

    plan = MergePlan(
        vocab_size=new_vocab_size,
        lora_modules=len(contents.lora_modules),
        replaced=len(replacements),
    )
    for name, entry in base_tensors.items():
        replacement = replacements.get(name)
        source_dtype = adapter.dtype(replacement) if replacement else entry.dtype
        dtype = entry.dtype
        if output_dtype is not None and entry.dtype.is_floating_point:
            dtype = output_dtype
        plan.tensors.append(
            PlannedTensor(
                spec=TensorSpec(name=name, dtype=dtype, shape=shape_of(name)),
                source="adapter" if replacement else "base",
                source_key=replacement or name,
                source_dtype=source_dtype,
                delta=deltas.get(name),
                dequantized=entry.quantized is not None and not replacement,
                token_rows=token_rows.get(name),
            )
        )
    _add_new_biases(plan, added_biases, base, deltas, output_dtype)
    if tied_embedding is not None and not head_stored:
        _untie_if_changed(
            plan, tied_embedding, replacements, deltas, token_rows, adapter, base, output_dtype
        )
    elif (
        head_stored
        and base.config.get("tie_word_embeddings") is not False
        and any(
            key in replacements or key in deltas or key in token_rows
            for key in base_tensors
            if key == TIED_HEAD_NAME or key.endswith(INPUT_EMBEDDING_SUFFIXES)
        )
    ):
        # Both tensors are stored, but transformers would tie them on load (when
        # config.json says so, or leaves it to a class default that may) and
        # overwrite the head with the changed embedding, or the reverse.
        plan.config_updates["tie_word_embeddings"] = False
    return plan


def _refuse_unmerge(contents: AdapterContents) -> None:
    """``--unmerge`` can only subtract deltas: refuse what replaced values in the merge.

    Raises:
        InvalidInputError: the adapter replaces whole tensors or token rows, whose
            former values it does not hold.
    """
    if contents.replacements:
        target, key = next(iter(contents.replacements.items()))
        raise InvalidInputError(
            f"--unmerge cannot restore {target!r}: the adapter replaces it wholesale with "
            f"{key!r} (modules_to_save, a saved embedding or trained biases) and does not hold "
            "the values it replaced; keep the base model and merge again instead"
        )
    if contents.trainable_tokens:
        module, key = next(iter(contents.trainable_tokens.items()))
        raise InvalidInputError(
            f"--unmerge cannot restore the rows of {module!r} that trainable tokens ({key!r}) "
            "replaced: the adapter does not hold their former values; keep the base model and "
            "merge again instead"
        )


def _plan_token_rows(
    module: str,
    key: str,
    config: LoraAdapterConfig,
    adapter: TensorSource,
    weight_shape: tuple[int, ...],
) -> TokenRows:
    """Check a ``trainable_tokens_delta`` against its config indices and its embedding.

    Raises:
        InvalidInputError: the config names no indices for the module.
        AdapterMismatchError: the rows do not fit the embedding.
    """
    indices = config.token_indices_for(module)
    if indices is None:
        raise InvalidInputError(
            f"adapter key {key!r} holds trainable tokens but adapter_config.json's "
            f"'trainable_token_indices' names no rows for {module!r}; the config does not "
            "belong to these weights"
        )
    shape = adapter.shape(key)
    if shape != (len(indices), *weight_shape[1:]):
        raise AdapterMismatchError(
            f"adapter key {key!r} has shape {shape} but {len(indices)} trainable token ids "
            f"of an embedding with rows of {weight_shape[1:]} call for "
            f"{(len(indices), *weight_shape[1:])}"
        )
    if indices and max(indices) >= weight_shape[0]:
        raise AdapterMismatchError(
            f"trainable token id {max(indices)} for {module!r} is beyond the embedding's "
            f"{weight_shape[0]} rows: was the adapter trained on a resized vocabulary?"
        )
    return TokenRows(key=key, indices=tuple(indices))


def _share_tied_base_layer(
    replacements: dict[str, str], shared_copies: set[str], embedding: str
) -> None:
    """A saved base layer of a tied embedding or head is their one shared parameter.

    PEFT saves ``X.base_layer.weight`` when it wraps an embedding (e.g. resized); in
    the tied model that parameter is the head's too, so loading the adapter sets both.
    A modules_to_save copy, by contrast, belongs to its module alone.
    """
    for one, other in ((embedding, TIED_HEAD_NAME), (TIED_HEAD_NAME, embedding)):
        if one in shared_copies and other not in replacements:
            replacements[other] = replacements[one]


def tied_input_embedding(base: BaseCheckpoint) -> str | None:
    """The input embedding the output head is one parameter with, if the base is tied.

    Tied when config.json says ``tie_word_embeddings: true`` (transformers then
    ignores a stored head), or says nothing and the checkpoint stores no head.
    """
    declared = base.config.get("tie_word_embeddings")
    if declared is False or (declared is None and TIED_HEAD_NAME in base.tensors):
        return None
    return next((key for key in base.tensors if key.endswith(INPUT_EMBEDDING_SUFFIXES)), None)


def _untie_if_changed(
    plan: MergePlan,
    embedding: str,
    replacements: dict[str, str],
    deltas: dict[str, LoraProduct | LoraBias],
    token_rows: dict[str, TokenRows],
    adapter: TensorSource,
    base: BaseCheckpoint,
    output_dtype: torch.dtype | None,
) -> None:
    """Write a tied head explicitly, and untie it, when the adapter changes either tensor.

    Trainable tokens alone keep the tie: PEFT replaces the same rows of a tied head.

    Without an adapter the head *is* the embedding. PEFT wraps them separately: a LoRA
    (or a trained copy) on one does not change the other in the unmerged model, so
    each gets its own values and ``tie_word_embeddings`` becomes false; otherwise
    reloading would overwrite one with the other (PEFT #2018, transformers #45127).
    When the adapter touches neither, the output stays tied.
    """
    changed = (embedding, TIED_HEAD_NAME)
    if not any(key in replacements or key in deltas for key in changed):
        return
    replacement = replacements.get(TIED_HEAD_NAME)
    entry = base.tensors[embedding]
    shape = adapter.shape(replacement) if replacement else entry.shape
    if plan.vocab_size is not None and shape[0] != plan.vocab_size:
        raise AdapterMismatchError(
            f"the adapter resizes the vocabulary to {plan.vocab_size} rows but the base's head "
            f"is tied to {embedding!r} and the adapter saves no {TIED_HEAD_NAME!r} of that size; "
            "save the adapter with the resized lm_head too (PEFT modules_to_save)"
        )
    dtype = entry.dtype if output_dtype is None else output_dtype
    plan.tensors.append(
        PlannedTensor(
            spec=TensorSpec(name=TIED_HEAD_NAME, dtype=dtype, shape=shape),
            source="adapter" if replacement else "base",
            source_key=replacement or embedding,
            source_dtype=adapter.dtype(replacement) if replacement else entry.dtype,
            delta=deltas.get(TIED_HEAD_NAME),
            # PEFT wraps a tied head with the embedding's trainable tokens too.
            token_rows=token_rows.get(TIED_HEAD_NAME, token_rows.get(embedding)),
            dequantized=entry.quantized is not None and not replacement,
        )
    )
    plan.config_updates["tie_word_embeddings"] = False


def _added_bias(
    module: LoraModuleKeys,
    bias_key: str,
    weight_key: str,
    model_type: object,
) -> tuple[str, str]:
    """A LoRA bias for a layer the base built without one: the config flag that gives it one.

    PEFT cannot merge this (``lora_bias=True`` on a layer without a bias); the merge
    is simply ``0 + scale * b``, provided the architecture can hold the bias.

    Raises:
        AdapterMismatchError: no config flag of this architecture gives the layer a bias.
    """
    flag = bias_flag_for(model_type if isinstance(model_type, str) else None, module.module)
    if flag is None:
        raise AdapterMismatchError(
            f"adapter key {module.bias_key!r} adds a bias to {weight_key!r}, which has none, and "
            f"{model_type or 'this'} models have no config.json flag that gives that layer a "
            "bias, so the merged model could not load it; retrain with lora_bias=False"
        )
    return bias_key, flag[0]


def _add_new_biases(
    plan: MergePlan,
    added: list[tuple[str, str]],
    base: BaseCheckpoint,
    deltas: dict[str, LoraProduct | LoraBias],
    output_dtype: torch.dtype | None,
) -> None:
    """Append biases the base lacks, and switch their config flags on.

    A flag such as Llama's ``attention_bias`` gives every module of its group, in
    every layer, a bias: those the adapter does not train get zeros, which is what
    the base computed without them.
    """
    model_type = base.config.get("model_type")
    for _, flag in added:
        plan.config_updates[flag] = True
    flags = {flag for _, flag in added}
    for name, entry in base.tensors.items():
        if not name.endswith(".weight") or len(entry.shape) != 2:
            continue
        bias_name = name.removesuffix("weight") + "bias"
        module = name.removesuffix(".weight")
        found = bias_flag_for(model_type if isinstance(model_type, str) else None, module)
        if bias_name in base.tensors or found is None or found[0] not in flags:
            continue
        dtype = output_dtype if output_dtype is not None else entry.dtype
        plan.tensors.append(
            PlannedTensor(
                spec=TensorSpec(name=bias_name, dtype=dtype, shape=(entry.shape[0],)),
                source="zeros",
                source_key=bias_name,
                source_dtype=dtype,
                delta=deltas.get(bias_name),
            )
        )


class BaseNames:
    """Finds the base tensor an adapter name refers to.

    Adapters name tensors as the model object that was trained saw them; the
    base checkpoint may have been saved from a different class (``GPT2Model``
    vs ``GPT2LMHeadModel``: ``h.0...`` vs ``transformer.h.0...``), and tools
    other than PEFT may drop or keep prefixes. An exact match wins; otherwise
    one leading component may be dropped from the adapter's name or one of the
    base's own leading components added, provided exactly one base tensor
    matches that way (two would make the merge a guess).
    """

    def __init__(self, base_keys: Iterable[str]) -> None:
        self._keys = set(base_keys)
        self._prefixes = sorted({key.split(".", 1)[0] for key in self._keys if "." in key})

    def find(self, name: str) -> list[str]:
        """The base keys ``name`` may refer to: one, none, or several when it is ambiguous."""
        if name in self._keys:
            return [name]
        candidates = [name.split(".", 1)[1]] if "." in name else []
        candidates.extend(f"{prefix}.{name}" for prefix in self._prefixes)
        return [candidate for candidate in candidates if candidate in self._keys]

    def locate(self, name: str, adapter_key: str) -> str:
        """The base key for ``name``.

        Raises:
            AdapterMismatchError: no base tensor, or more than one, matches (names the adapter key).
        """
        found = self.find(name)
        if len(found) == 1:
            return found[0]
        if found:
            raise AdapterMismatchError(
                f"adapter key {adapter_key!r} targets {name!r}, which could be any of the base "
                f"tensors {found[:3]}; rename the adapter's keys to the base's full names "
                "(e.g. with the 'base_model.model.' prefix PEFT writes)"
            )
        raise self.unmatched_error([(adapter_key, name)])

    def closest(self, name: str, count: int = 3) -> list[str]:
        """The base keys that look most like ``name`` (for error messages)."""
        return difflib.get_close_matches(name, sorted(self._keys), n=count, cutoff=0.4)

    def unmatched_error(self, unmatched: list[tuple[str, str]]) -> AdapterMismatchError:
        """One error for adapter keys that match no base tensor: a few of them, and close base keys.

        Args:
            unmatched: (adapter key, the base name it was taken to mean) pairs.
        """
        adapter_key, name = unmatched[0]
        hint = "was this adapter trained on a different base model?"
        others = ""
        if len(unmatched) > 1:
            more = [key for key, _ in unmatched[1:MAX_KEYS_IN_ERROR]]
            others = f" ({len(unmatched)} keys match nothing; also {more})"
        closest = self.closest(name)
        near = f"; the closest base tensors are {closest}" if closest else ""
        return AdapterMismatchError(
            f"adapter key {adapter_key!r} targets {name!r}, which is not a tensor of the base"
            f"{others}{near}: {hint}"
        )


@dataclass
class _ParameterDeltas:
    """The LoRAs on parameters (MoE experts) of an adapter, planned.

    Attributes:
        products: base key -> the product to add to it.
        modules: the adapter modules these came from (they have no ``.weight``).
    """

    products: dict[str, LoraProduct] = field(default_factory=dict)
    modules: set[str] = field(default_factory=set)


def _plan_parameter_loras(
    base: BaseCheckpoint,
    base_names: BaseNames,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
) -> _ParameterDeltas:
    """Plan the LoRAs PEFT puts on parameters (``target_parameters``, MoE experts).

    A LoRA module is one when the base has no ``{module}.weight`` but the module
    (without PEFT's nested ``.base_layer``) holds a fused expert parameter, or
    per-expert tensors that make one.

    Raises:
        AdapterMismatchError: two LoRAs fit the same parameter, or one fits none.
        InvalidInputError: a parameter LoRA carries a ``lora_B.bias``.
    """
    deltas = _ParameterDeltas()
    names = [name.rsplit(".", 1)[-1] for name in config.target_parameters]
    names += [layout.parameter for layout in PER_EXPERT_LAYOUTS]
    model_type = base.config.get("model_type")
    declared = declared_expert_count(base.config)

    def shape_of(key: str) -> tuple[int, ...]:
        return base.tensors[key].shape

    claimed: dict[str, str] = {}  # parameter -> adapter key of the LoRA that fits it
    for module in contents.lora_modules.values():
        if base_names.find(f"{module.module}.weight"):
            continue
        owner = owner_module(module.module)
        targets = expert_targets(owner, names, base_names.find, shape_of)
        if not targets:
            continue
        for target in targets:
            if target.experts > 1 and declared not in (None, target.experts):
                raise AdapterMismatchError(
                    f"{target.parameter!r} has {target.experts} experts in BASE's weights but "
                    f"config.json declares {declared}: the checkpoint is incomplete or inconsistent"
                )
        assert module.a_key is not None and module.b_key is not None
        if module.bias_key is not None:
            raise InvalidInputError(
                f"adapter key {module.bias_key!r} is a LoRA bias on a parameter "
                "(target_parameters), which lora-merge does not support"
            )
        a_shape, b_shape = adapter.shape(module.a_key), adapter.shape(module.b_key)
        target, transposed = match_expert_target(
            module.a_key, a_shape, b_shape, targets, model_type
        )
        if target.parameter in claimed:
            raise AdapterMismatchError(
                f"adapter keys {claimed[target.parameter]!r} and {module.a_key!r} both fit "
                f"{target.parameter!r}; the adapter is inconsistent"
            )
        claimed[target.parameter] = module.a_key
        deltas.modules.add(module.module)
        rank = a_shape[0] // target.experts
        # PEFT matches rank/alpha patterns against the parameter's name ("...experts.down_proj").
        scale = config.scale_for(target.parameter, rank)
        product = LoraProduct(
            module.a_key, module.b_key, scale, transposed, "experts", experts=target.experts
        )
        if target.fused_key is not None:
            deltas.products[target.fused_key] = product
            continue
        for expert, keys in enumerate(target.part_keys):
            start = 0
            for key, rows in zip(keys, target.part_rows, strict=True):
                deltas.products[key] = dataclasses.replace(
                    product, expert=expert, b_rows=(start, start + rows)
                )
                start += rows
    return deltas


def _refuse_loralib_conv(base_names: BaseNames, contents: AdapterContents) -> None:
    """loralib's ConvLoRA keeps its weight at ``X.conv.weight``: name it rather than "no match"."""
    for module in contents.lora_modules.values():
        if base_names.find(f"{module.module}.conv.weight"):
            raise InvalidInputError(
                f"adapter key {module.a_key!r} is a loralib ConvLoRA (its weight is "
                f"{module.module}.conv.weight), which lora-merge does not support"
            )


def _plan_merged_linear(
    module: LoraModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    loralib: LoralibSettings,
    model_type: object,
) -> LoraProduct:
    """A loralib ``MergedLinear``: A (r·k, in), B (out/G·k, r), k of G output groups enabled.

    Raises:
        AdapterMismatchError: the shapes are no MergedLinear of this rank on this weight.
        InvalidInputError: which groups are enabled cannot be told and ``--enable-lora`` is absent.
    """
    assert module.a_key is not None and module.b_key is not None
    a_shape, b_shape = adapter.shape(module.a_key), adapter.shape(module.b_key)
    rank = loralib.rank
    enabled, remainder = divmod(a_shape[0], rank) if len(a_shape) == 2 else (0, 1)
    if not enabled or remainder or len(b_shape) != 2 or b_shape[1] != rank or b_shape[0] % enabled:
        raise AdapterMismatchError(
            f"adapter module {module.module!r} has A {tuple(a_shape)} and B {tuple(b_shape)}: "
            f"neither a loralib Linear nor a MergedLinear of rank {rank}; check --rank"
        )
    group_rows, in_features = b_shape[0] // enabled, a_shape[1]
    orientations = []
    if len(weight_shape) == 2 and weight_shape[1] == in_features:
        orientations.append(False)
    if len(weight_shape) == 2 and weight_shape[0] == in_features:
        orientations.append(True)
    if len(orientations) == 2:  # square: fan_in_fan_out is the architecture's to say
        known = is_conv1d_module(model_type if isinstance(model_type, str) else None, module.module)
        orientations = [bool(known)]
    if not orientations or weight_shape[int(orientations[0])] % group_rows:
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
    transposed = orientations[0]
    groups = weight_shape[1 if transposed else 0] // group_rows
    enable_lora = loralib.enable_lora
    if enabled == groups:  # every group adapted: nothing to choose
        enable_lora = (True,) * groups
    elif enable_lora is None:
        raise InvalidInputError(
            f"adapter module {module.module!r} is a loralib MergedLinear with {enabled} of "
            f"{groups} output groups adapted, and the file does not say which: pass "
            "--enable-lora with its enable_lora list (e.g. 1,0,1 for q and v of a fused qkv)"
        )
    if len(enable_lora) != groups or sum(enable_lora) != enabled:
        raise AdapterMismatchError(
            f"--enable-lora {','.join(str(int(g)) for g in enable_lora)} does not fit adapter "
            f"module {module.module!r}: it has {enabled} of {groups} output groups adapted"
        )
    return LoraProduct(
        a_key=module.a_key,
        b_key=module.b_key,
        scale=loralib.alpha / rank,
        transposed=transposed,
        layer="merged_linear",
        groups=enable_lora,
    )


def _check_every_name_matches(
    base_names: BaseNames, contents: AdapterContents, parameter_modules: set[str]
) -> None:
    """Refuse, listing a few of them, adapter names that match no base tensor.

    Args:
        parameter_modules: adapter modules planned as parameter LoRAs (no ``.weight``).

    Raises:
        AdapterMismatchError: some names match nothing; ambiguous names are
            reported later by :meth:`BaseNames.locate`.
    """
    wanted = [(key, name) for name, key in contents.replacements.items()]
    for module in contents.lora_modules.values():
        if module.module in parameter_modules:
            continue
        # (A LoRA bias is located later, beside its weight.)
        wanted.append((module.a_key or module.module, f"{module.module}.weight"))
    unmatched = [(key, name) for key, name in wanted if not base_names.find(name)]
    if unmatched:
        raise base_names.unmatched_error(unmatched)


def _plan_lora_product(
    module: LoraModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
    model_type: object,
) -> LoraProduct:
    assert module.a_key is not None and module.b_key is not None
    a_shape, b_shape = adapter.shape(module.a_key), adapter.shape(module.b_key)
    if len(a_shape) != len(b_shape) or len(a_shape) < 2:
        raise InvalidInputError(
            f"adapter module {module.module!r} has LoRA matrices of shapes {a_shape} and {b_shape}; "
            "only Linear, Conv1D, Embedding and convolution LoRA layers are supported"
        )
    if len(a_shape) > 2:  # first: a grouped convolution's B has r / groups columns
        _check_convolution(module, a_shape, b_shape, weight_key, weight_shape)
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise AdapterMismatchError(
            f"adapter module {module.module!r}: A is {a_shape} but B is {b_shape}; their ranks "
            "differ, so the adapter file is inconsistent"
        )
    scale = config.scale_for(module.module, rank)
    if len(a_shape) > 2:
        transposed, layer = False, "convolution"
    else:
        transposed = _is_transposed_2d(
            module, a_shape, b_shape, weight_key, weight_shape, config, model_type
        )
        layer = "embedding" if module.is_embedding else ("conv1d" if transposed else "linear")
    if module.magnitude_key is not None:
        magnitude_shape = adapter.shape(module.magnitude_key)
        # (out,) for Linear and Embedding; PEFT's convolutions keep the norm's
        # dimensions: (1, out, 1, ...).
        if sorted(magnitude_shape) != [1] * (len(magnitude_shape) - 1) + [b_shape[0]]:
            raise AdapterMismatchError(
                f"adapter key {module.magnitude_key!r} has shape {magnitude_shape} but the module "
                f"has {b_shape[0]} output features: the DoRA magnitude vector does not fit"
            )
        layer = f"dora-{layer}"
    return LoraProduct(
        a_key=module.a_key,
        b_key=module.b_key,
        scale=scale,
        transposed=transposed,
        layer=layer,
        dense=module.dense,
        magnitude_key=module.magnitude_key,
    )


def _check_convolution(
    module: LoraModuleKeys,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    weight_key: str,
    weight_shape: tuple[int, ...],
) -> None:
    """A (r, in, *kernel) and B (out, r, 1, ...) fit a convolution weight (out, in / groups, *kernel).

    PEFT's LoRA ``lora_A`` is a convolution over all input channels even when the
    base layer is grouped, and its delta for groups > 1 is a different formula,
    which we do not reproduce: refuse it by name.
    """
    assert module.a_key is not None
    if len(weight_shape) != len(a_shape) or weight_shape[0] != b_shape[0]:
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
    in_channels, per_group = a_shape[1], weight_shape[1]
    if in_channels != per_group:
        if per_group and in_channels % per_group == 0:
            raise InvalidInputError(
                f"adapter module {module.module!r} adapts a grouped convolution (groups = "
                f"{in_channels // per_group}, weight {weight_key!r} is {weight_shape}); lora-merge "
                "merges LoRA into convolutions with groups = 1 only"
            )
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
    if a_shape[2:] != weight_shape[2:] or any(size != 1 for size in b_shape[2:]):
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)


def _is_transposed_2d(
    module: LoraModuleKeys,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    weight_key: str,
    weight_shape: tuple[int, ...],
    config: LoraAdapterConfig,
    model_type: object,
) -> bool:
    """Whether a 2-D weight stores ``(B @ A).T`` (embeddings, Conv1D) or ``B @ A`` (Linear)."""
    assert module.a_key is not None
    if len(weight_shape) != 2:
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
    out_features, in_features = b_shape[0], a_shape[1]
    if module.is_embedding:
        # lora_embedding_A is (r, vocab) and B (dim, r): PEFT's delta is (B @ A).T.
        if weight_shape[1:] == (out_features,) and weight_shape[0] != in_features:
            raise AdapterMismatchError(
                f"adapter key {module.a_key!r} covers a vocabulary of {in_features} tokens but "
                f"base {weight_key!r} has {weight_shape[0]} rows: the adapter was trained after "
                "resizing the vocabulary; save it with the resized embeddings (PEFT "
                "save_embedding_layers=True or modules_to_save) or merge it into the resized base"
            )
        if weight_shape != (in_features, out_features):
            raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
        return True
    if in_features == out_features:
        if weight_shape != (out_features, in_features):
            raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
        known = is_conv1d_module(model_type if isinstance(model_type, str) else None, module.module)
        return config.fan_in_fan_out if known is None else known
    if weight_shape == (out_features, in_features):
        return False  # nn.Linear stores (out, in)
    if weight_shape == (in_features, out_features):
        return True  # transformers' Conv1D stores (in, out)
    raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)


def _resized_vocabulary(
    base_key: str, base_shape: tuple[int, ...], shape: tuple[int, ...], vocab_size: object
) -> int | None:
    """The new row count when a replacement only resizes an embedding or lm_head."""
    is_vocab_tensor = base_key.endswith(VOCAB_TENSOR_SUFFIXES) and base_shape[:1] == (vocab_size,)
    if is_vocab_tensor and len(shape) == len(base_shape) and shape[1:] == base_shape[1:]:
        return shape[0]
    return None


def _shape_mismatch(
    adapter_key: str, shape: tuple[int, ...], base_key: str, base_shape: tuple[int, ...]
) -> AdapterMismatchError:
    return AdapterMismatchError(
        f"adapter key {adapter_key!r} has shape {tuple(shape)} but base {base_key!r} is "
        f"{tuple(base_shape)}: was this adapter trained on a different base model?"
    )
