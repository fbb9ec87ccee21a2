"""Build the merge plan: every output tensor's name, dtype, shape, source and delta.

The plan is made from headers and adapter shapes only (no tensor data), so every
mismatch is reported before the first byte of OUT is written, and the writer
knows every shard's header in advance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents, LoraModuleKeys
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.plan.architectures import VOCAB_TENSOR_SUFFIXES, is_conv1d_module
from lora_merge.plan.four_bit_format import FourBitFormat

SourceName = Literal["base", "adapter"]


@dataclass(frozen=True)
class LoraProduct:
    """``scale * B @ A`` to add to a weight, possibly transposed.

    Attributes:
        a_key / b_key: adapter keys of A (r, in) and B (out, r).
        scale: alpha / r (or alpha / sqrt(r) for rsLoRA).
        transposed: the stored weight is ``(B @ A).T``-shaped: GPT-2 Conv1D
            (fan_in_fan_out) and embeddings (``lora_embedding_A`` is (r, vocab)).
        layer: the kind of layer, for reports: "linear", "conv1d" or "embedding".
        dense: ``a_key`` is the whole delta in ``B @ A``'s (out, in) layout and
            ``b_key`` is not read (a combination kept at full rank).
    """

    a_key: str
    b_key: str
    scale: float
    transposed: bool
    layer: str = "linear"
    dense: bool = False


@dataclass(frozen=True)
class LoraBias:
    """``scale * b`` to add to a bias (PEFT ``lora_bias=True``: ``lora_B.bias``)."""

    bias_key: str
    scale: float


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how to produce it.

    Attributes:
        spec: output name, dtype and shape.
        source: where the starting values are read: the base, or a full tensor
            in the adapter that replaces the base's.
        source_key: the key in that source.
        source_dtype: dtype of the starting values as read (a quantized weight's
            dequantized dtype).
        delta: what to add, if anything.
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
    dequantized: bool = False
    requantize: FourBitFormat | None = None
    written_with: str | None = None

    @property
    def is_byte_copy(self) -> bool:
        """Untouched, stored as is and same dtype: copy the stored bytes, never decode them."""
        return (
            self.source == "base"
            and self.delta is None
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
    """

    tensors: list[PlannedTensor] = field(default_factory=list)
    vocab_size: int | None = None
    lora_modules: int = 0
    replaced: int = 0

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
    def lora_modules_by_layer(self) -> dict[str, int]:
        """LoRA modules merged, counted by layer kind (linear, conv1d, embedding)."""
        return dict(Counter(p.layer for p in self.lora_products))


def build_merge_plan(
    base: BaseCheckpoint,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
    output_dtype: torch.dtype | None,
) -> MergePlan:
    """Decide every output tensor. Reads shapes and dtypes only.

    Args:
        base: the base checkpoint's tensor locations and config.
        config: the adapter's config.
        contents: the adapter's keys, sorted by role.
        adapter: the adapter's tensors (only shapes and dtypes are looked at).
        output_dtype: dtype for every floating-point tensor, or None to keep each one's.

    Raises:
        AdapterMismatchError: an adapter tensor matches no base tensor or does not fit it.
    """
    base_tensors = base.tensors  # quantized weights appear dequantized; their parts are hidden
    base_names = BaseNames(base_tensors)
    vocab_size = base.config.get("vocab_size")
    model_type = base.config.get("model_type")

    replacements: dict[str, str] = {}
    new_vocab_size: int | None = None
    for adapter_name, adapter_key in contents.replacements.items():
        base_key = base_names.locate(adapter_name, adapter_key)
        base_shape = base_tensors[base_key].shape
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

    def shape_of(base_key: str) -> tuple[int, ...]:
        key = replacements.get(base_key)
        return adapter.shape(key) if key is not None else base_tensors[base_key].shape

    deltas: dict[str, LoraProduct | LoraBias] = {}
    for module in contents.lora_modules.values():
        weight_key = base_names.locate(f"{module.module}.weight", module.a_key or module.module)
        deltas[weight_key] = _plan_lora_product(
            module, weight_key, shape_of(weight_key), adapter, config, model_type
        )
        if module.bias_key is not None:
            bias_key = base_names.locate(f"{module.module}.bias", module.bias_key)
            if adapter.shape(module.bias_key) != shape_of(bias_key):
                raise _shape_mismatch(
                    module.bias_key, adapter.shape(module.bias_key), bias_key, shape_of(bias_key)
                )
            rank = adapter.shape(module.a_key or "")[0]
            deltas[bias_key] = LoraBias(module.bias_key, config.scale_for(module.module, rank))

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
            )
        )
    return plan


class BaseNames:
    """Finds the base tensor an adapter name refers to.

    Adapters name tensors as the model object that was trained saw them; the
    base checkpoint may have been saved from a different class (``GPT2Model``
    vs ``GPT2LMHeadModel``: ``h.0...`` vs ``transformer.h.0...``). An exact
    match wins; otherwise one leading component may be dropped from the
    adapter's name or one of the base's own leading components added.
    """

    def __init__(self, base_keys: Iterable[str]) -> None:
        self._keys = set(base_keys)
        self._prefixes = sorted({key.split(".", 1)[0] for key in self._keys if "." in key})

    def locate(self, name: str, adapter_key: str) -> str:
        """The base key for ``name``.

        Raises:
            AdapterMismatchError: no base tensor matches (names the adapter key).
        """
        candidates = [name]
        if "." in name:
            candidates.append(name.split(".", 1)[1])
        candidates.extend(f"{prefix}.{name}" for prefix in self._prefixes)
        for candidate in candidates:
            if candidate in self._keys:
                return candidate
        hint = "was this adapter trained on a different base model?"
        if name.endswith("lm_head.weight"):
            hint = (
                "the base stores no lm_head (its embeddings are tied); merging into tied "
                "embeddings is not supported yet"
            )
        raise AdapterMismatchError(
            f"adapter key {adapter_key!r} targets {name!r}, which is not a tensor of the base: {hint}"
        )


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
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise InvalidInputError(
            f"adapter module {module.module!r} has LoRA matrices of shapes {a_shape} and {b_shape}; "
            "only Linear, Conv1D and Embedding LoRA layers are supported so far"
        )
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise AdapterMismatchError(
            f"adapter module {module.module!r}: A is {a_shape} but B is {b_shape}; their ranks "
            "differ, so the adapter file is inconsistent"
        )
    if len(weight_shape) != 2:
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
    out_features, in_features = b_shape[0], a_shape[1]
    scale = config.scale_for(module.module, rank)
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
        transposed = True
    elif in_features == out_features:
        if weight_shape != (out_features, in_features):
            raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
        known = is_conv1d_module(model_type if isinstance(model_type, str) else None, module.module)
        transposed = config.fan_in_fan_out if known is None else known
    elif weight_shape == (out_features, in_features):
        transposed = False  # nn.Linear stores (out, in)
    elif weight_shape == (in_features, out_features):
        transposed = True  # transformers' Conv1D stores (in, out)
    else:
        raise _shape_mismatch(module.a_key, a_shape, weight_key, weight_shape)
    layer = "embedding" if module.is_embedding else ("conv1d" if transposed else "linear")
    return LoraProduct(
        a_key=module.a_key,
        b_key=module.b_key,
        scale=scale,
        transposed=transposed,
        layer=layer,
        dense=module.dense,
    )


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
