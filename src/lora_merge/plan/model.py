"""The merge plan's data types: every output tensor, where it comes from and what is added.

:func:`lora_merge.plan.planner.build_merge_plan` makes a :class:`MergePlan` from
headers and adapter shapes alone; the stream (:mod:`lora_merge.stream`) executes
it and ``--verify`` (:mod:`lora_merge.finish.verify`) checks the output against it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lora_merge.adapter.config import OftSettings
from lora_merge.dtypes import DType
from lora_merge.io.shard_writer import TensorSpec

if TYPE_CHECKING:  # only a quantized base's or --qlora-base's plan holds them
    from lora_merge.compute.training_quantization import TrainingQuantization
    from lora_merge.io.formats.protocol import NativeTarget

# The prefix of a DoRA module's layer kind ("dora-linear"): see lora_merge.plan.kinds.dora.
DORA_PREFIX = "dora-"
# "zeros": a tensor the base lacks and that starts at zero (a bias the adapter adds).
SourceName = Literal["base", "adapter", "zeros"]


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
            "merged_linear" (loralib), prefixed with "dora-" for DoRA modules; each
            kind's shape rule and formula are in :mod:`lora_merge.plan.kinds`.
        dense: ``a_key`` is the whole delta in ``B @ A``'s (out, in) layout and
            ``b_key`` is not read (a combination kept at full rank).
        magnitude_key: DoRA's magnitude vector m (one value per output feature):
            the result is ``m / ||V|| * V`` with ``V = W + scale * B @ A`` and the
            norm taken per output feature (a row of the stored weight, or a column
            when ``transposed``).
        experts: E when A and B hold the LoRAs of E experts (PEFT ``target_parameters``,
            see :mod:`lora_merge.plan.kinds.experts`); 1 otherwise.
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
    def kind(self) -> str:
        """The layer kind whose module in :mod:`lora_merge.plan.kinds` reads its factors."""
        return self.layer.removeprefix(DORA_PREFIX)


@dataclass(frozen=True)
class LoraBias:
    """``scale * b`` to add to a bias (PEFT ``lora_bias=True``: ``lora_B.bias``)."""

    bias_key: str
    scale: float


@dataclass(frozen=True)
class TunerUpdate:
    """One module of an adapter that is not LoRA (AdaLoRA, IA3, LoHa, LoKr): its update of a tensor.

    Each type's shape rule and formula are in its own module of :mod:`lora_merge.tuners`
    (``tuner`` names it); the stream asks that module for the merged rows.

    Attributes:
        tuner: the adapter type, a key of :data:`lora_merge.tuners.registry.TUNERS`
            (``"adalora"``, ``"ia3"``, ``"loha"``, ``"lokr"``, ``"oft"``, ``"vera"``).
        module: the module's name in the base model.
        keys: (role, adapter key) of every tensor of the module, e.g.
            ``("hada_w1_a", "...q_proj.hada_w1_a")``.
        scale: the factor of an additive update (``alpha / r``); 1.0 for IA3.
        layer: the layer kind, for reports and the shape rule: ``"linear"``,
            ``"conv1d"`` (transformers' Conv1D, stored (in, out)), ``"convolution"``
            or ``"bias"`` (IA3 scales a layer's bias with its weight).
        feedforward: IA3 only: the vector scales the layer's inputs (columns of
            ``nn.Linear``'s weight) rather than its outputs.
        unmerge: undo the update (``--unmerge``): IA3 divides, additive types subtract.
        ranknum: AdaLoRA only: the initial rank its delta is divided by.
        oft: OFT only: how its rotations are built.
        projections: VeRA saved without its shared A and B: (seed, r, in_max, out_max)
            to regenerate them as PEFT does; None otherwise.
        projection_dtype: the dtype PEFT rounds regenerated A and B to: the base
            layer's (``_move_adapter_to_device_of_base_layer`` casts them to it before
            the float32 autocast); None to keep them float32.
    """

    tuner: str
    module: str
    keys: tuple[tuple[str, str], ...]
    scale: float
    layer: str
    feedforward: bool = False
    unmerge: bool = False
    ranknum: int = 0
    oft: OftSettings | None = None
    projections: tuple[int, int, int, int] | None = None
    projection_dtype: DType | None = None

    def key(self, role: str) -> str | None:
        """The adapter key of one of the module's tensors, or None when it has no such role."""
        return dict(self.keys).get(role)


# What a plan adds to (or does with) one base tensor.
Delta = LoraProduct | LoraBias | TunerUpdate


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
        dequantized_in_chunks: a dequantized weight whose reader decodes any number of
            rows with the same workspace (``QuantizedWeight.reads_in_chunks``), so the
            stream reads it in I/O-sized tiles as it reads a plain weight.
        requantize: write the merged weight quantized in this format (``spec`` is then
            the first of its stored tensors); ``--save-method merged_4bit`` or
            ``merged_native``.
        written_with: this tensor is part of the quantized group of that weight and is
            written with it (absmax, quant map, quant state; block scales).
        as_trained: the base weight is read as ``dequant(quant(W))`` in this format,
            as QLoRA training saw it (``--qlora-base``), so it is never a byte copy.
    """

    spec: TensorSpec
    source: SourceName
    source_key: str
    source_dtype: DType
    delta: LoraProduct | LoraBias | TunerUpdate | None = None
    token_rows: TokenRows | None = None
    dequantized: bool = False
    dequantized_in_chunks: bool = False
    requantize: NativeTarget | None = None
    written_with: str | None = None
    as_trained: TrainingQuantization | None = None

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
            and self.as_trained is None
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
    def tuner_updates(self) -> list[TunerUpdate]:
        """The updates of a non-LoRA adapter (AdaLoRA, IA3, LoHa, LoKr), one per tensor they change."""
        return [t.delta for t in self.tensors if isinstance(t.delta, TunerUpdate)]

    @property
    def module_scales(self) -> Counter[float]:
        """How many modules use each scale (LoRA's, LoHa's and LoKr's ``alpha / r``; IA3 has none)."""
        scales = Counter(p.scale for p in self.module_products)
        scales.update(u.scale for u in self.tuner_updates if u.tuner != "ia3")
        return scales

    @property
    def lora_modules_by_layer(self) -> dict[str, int]:
        """Modules merged, counted by layer kind (linear, conv1d, embedding, experts, ...).

        A non-LoRA adapter's modules are counted by type and kind (``ia3-linear``,
        ``loha-convolution``); IA3's scaled biases are part of their module.
        """
        counts = Counter(p.layer for p in self.module_products)
        counts.update(f"{u.tuner}-{u.layer}" for u in self.tuner_updates if u.layer != "bias")
        return dict(counts)
