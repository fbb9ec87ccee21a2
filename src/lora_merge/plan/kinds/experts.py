"""LoRA on a parameter (PEFT ``target_parameters``): fused MoE experts.

transformers >= 5 fuses the experts of a MoE block into 3-D parameters, e.g.
Qwen3-MoE's ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I),
and PEFT's ``lora.ParamWrapper`` (``peft/tuners/lora/layer.py``) puts one LoRA
on each such parameter: A is (r·E, in), B is (out, r·E), and
``get_delta_weight`` reshapes A to (E, r, in) and B to (out, r, E), so expert e
uses rows ``e·r:(e+1)·r`` of A and the *interleaved* columns ``e::E`` of B:
``ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]``, stored (E, out, in), or transposed
(E, in, out) for modules that set ``is_transposed`` (gpt-oss).

Two parameters on one module nest (``ParamWrapper(ParamWrapper(experts))``), so
PEFT saves ``experts.lora_A.weight`` and ``experts.base_layer.lora_A.weight``;
which parameter each belongs to is told apart by shape, never by order.

Checkpoints of most MoE models keep one tensor per expert (transformers converts
them when loading and back when saving): ``mlp.experts.{e}.gate_proj.weight``
and ``up_proj`` stacked along rows make ``gate_up_proj[e]``. Those are planned
as ordinary 2-D products over a slice of A's rows and of B's rows and columns.

Shape rule: :func:`plan_parameter_loras` (which parameters a module may target,
:func:`expert_targets`, and which one its shapes fit, :func:`match_expert_target`).
Formula: :func:`read_factors` and :func:`expert_lora_factors` (expert e's A and B).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import LoraProduct
from lora_merge.plan.names import BaseNames

# torch names types only: a plan, made before torch is imported, needs none of it
# (issue 24); the tensors come from the adapter's reader.
if TYPE_CHECKING:
    import torch

LAYER = "experts"

BASE_LAYER_INFIX = ".base_layer"

# model_type -> fused expert parameters are stored (E, in, out), PEFT's ``is_transposed``.
TRANSPOSED_EXPERTS_MODEL_TYPES = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})


# config.json fields that give the number of routed experts, across MoE architectures.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def declared_expert_count(config: dict[str, object]) -> int | None:
    """The number of experts the base's config.json declares, if it declares one."""
    for name in EXPERT_COUNT_FIELDS:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class PerExpertLayout:
    """How a checkpoint with one tensor per expert stores a fused expert parameter.

    Attributes:
        parameter: the fused parameter's name in transformers >= 5, e.g. ``gate_up_proj``.
        parts: per-expert tensor names under the experts module, stacked along the
            fused parameter's rows in this order; ``{e}`` is the expert index.
        module_rename: (in the adapter's module name, in the checkpoint's) when the
            checkpoint names the block differently (Mixtral's ``block_sparse_moe``).
    """

    parameter: str
    parts: tuple[str, ...]
    module_rename: tuple[str, str] | None = None


# transformers' conversion_mapping.py ("qwen2_moe", used by Qwen3-MoE, OLMoE,
# DeepSeek-V2/V3, GLM4-MoE and more; "mixtral"), read in reverse.
PER_EXPERT_LAYOUTS: tuple[PerExpertLayout, ...] = (
    PerExpertLayout("gate_up_proj", ("{e}.gate_proj.weight", "{e}.up_proj.weight")),
    PerExpertLayout("down_proj", ("{e}.down_proj.weight",)),
    PerExpertLayout(
        "gate_up_proj",
        ("{e}.w1.weight", "{e}.w3.weight"),
        (".mlp.experts", ".block_sparse_moe.experts"),
    ),
    PerExpertLayout("down_proj", ("{e}.w2.weight",), (".mlp.experts", ".block_sparse_moe.experts")),
)


@dataclass(frozen=True)
class ExpertTarget:
    """One parameter a parameter-LoRA may belong to, as the base stores it.

    Attributes:
        parameter: the parameter's full name as PEFT sees it, e.g. ``model.layers.0.mlp.experts.down_proj``.
        experts: E (1 for a 2-D parameter).
        fused_shape: (X, Y) of one expert's slice of the fused parameter.
        fused_key: the base key of the fused tensor, or None when stored per expert.
        part_keys: per expert, the base keys stacked along rows (per-expert storage).
        part_rows: the rows of each part.
    """

    parameter: str
    experts: int
    fused_shape: tuple[int, int]
    fused_key: str | None = None
    part_keys: tuple[tuple[str, ...], ...] = ()
    part_rows: tuple[int, ...] = ()


def owner_module(module: str) -> str:
    """``X.experts.base_layer.base_layer`` -> ``X.experts``: the module nested ParamWrappers wrap."""
    while module.endswith(BASE_LAYER_INFIX):
        module = module[: -len(BASE_LAYER_INFIX)]
    return module


def expert_targets(
    owner: str,
    parameter_names: list[str],
    find: Callable[[str], list[str]],
    shape_of: Callable[[str], tuple[int, ...]],
) -> list[ExpertTarget]:
    """The parameters of ``owner`` a LoRA may target, fused or per expert.

    Args:
        owner: the module holding the parameters, as the adapter names it.
        parameter_names: the parameter names to look for (``gate_up_proj``, ...).
        find: base keys a name may refer to (:meth:`~lora_merge.plan.names.BaseNames.find`).
        shape_of: the stored shape of a base key.
    """
    targets = []
    for name in dict.fromkeys(parameter_names):
        parameter = f"{owner}.{name}"
        found = find(parameter)
        if len(found) == 1:
            shape = shape_of(found[0])
            if len(shape) == 3:
                targets.append(ExpertTarget(parameter, shape[0], (shape[1], shape[2]), found[0]))
            elif len(shape) == 2:
                targets.append(ExpertTarget(parameter, 1, (shape[0], shape[1]), found[0]))
            continue
        for layout in PER_EXPERT_LAYOUTS:
            if layout.parameter != name:
                continue
            target = _per_expert_target(owner, parameter, layout, find, shape_of)
            if target is not None:
                targets.append(target)
                break
    return targets


def _per_expert_target(
    owner: str,
    parameter: str,
    layout: PerExpertLayout,
    find: Callable[[str], list[str]],
    shape_of: Callable[[str], tuple[int, ...]],
) -> ExpertTarget | None:
    module = owner
    if layout.module_rename is not None:
        old, new = layout.module_rename
        if old not in module:
            return None
        module = module.replace(old, new)
    experts: list[tuple[str, ...]] = []
    while True:
        keys = [find(f"{module}.{part.format(e=len(experts))}") for part in layout.parts]
        if not all(len(found) == 1 for found in keys):
            break
        experts.append(tuple(found[0] for found in keys))
    if not experts:
        return None
    shapes = [shape_of(key) for key in experts[0]]
    if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes) or any(
        [shape_of(key) for key in keys] != shapes for keys in experts
    ):
        return None
    rows = tuple(s[0] for s in shapes)
    return ExpertTarget(
        parameter, len(experts), (sum(rows), shapes[0][1]), part_keys=tuple(experts), part_rows=rows
    )


def match_expert_target(
    adapter_key: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    targets: list[ExpertTarget],
    model_type: object,
) -> tuple[ExpertTarget, bool]:
    """The parameter a LoRA pair fits, by shape, and whether its delta is stored transposed.

    Raises:
        AdapterMismatchError: no parameter, or several, fit the pair.
    """
    fits: list[tuple[ExpertTarget, bool]] = []
    for target in targets:
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] % target.experts:
            continue
        if b_shape[1] != a_shape[0]:
            continue
        out_features, in_features = b_shape[0], a_shape[1]
        straight = target.fused_shape == (out_features, in_features)
        transposed = target.fused_key is not None and target.fused_shape == (
            in_features,
            out_features,
        )
        if straight and transposed:  # square experts: only the architecture can tell
            fits.append((target, model_type in TRANSPOSED_EXPERTS_MODEL_TYPES))
        elif straight or transposed:
            fits.append((target, transposed))
    if len(fits) == 1:
        return fits[0]
    names = [target.parameter for target, _ in fits] or [t.parameter for t in targets]
    problem = "fits several parameters" if fits else "fits none of the parameters"
    raise AdapterMismatchError(
        f"adapter key {adapter_key!r} (A {tuple(a_shape)}, B {tuple(b_shape)}) is a LoRA on a "
        f"parameter (target_parameters) but {problem} {names}: was this adapter trained on "
        "a different base model?"
    )


@dataclass
class ParameterDeltas:
    """The LoRAs on parameters (MoE experts) of an adapter, planned.

    Attributes:
        products: base key -> the product to add to it.
        modules: the adapter modules these came from (they have no ``.weight``).
    """

    products: dict[str, LoraProduct] = field(default_factory=dict)
    modules: set[str] = field(default_factory=set)


def plan_parameter_loras(
    base: BaseCheckpoint,
    base_names: BaseNames,
    config: LoraAdapterConfig,
    contents: AdapterContents,
    adapter: TensorSource,
) -> ParameterDeltas:
    """Plan the LoRAs PEFT puts on parameters (``target_parameters``, MoE experts).

    A LoRA module is one when the base has no ``{module}.weight`` but the module
    (without PEFT's nested ``.base_layer``) holds a fused expert parameter, or
    per-expert tensors that make one.

    Raises:
        AdapterMismatchError: two LoRAs fit the same parameter, or one fits none.
        InvalidInputError: a parameter LoRA carries a ``lora_B.bias``.
    """
    deltas = ParameterDeltas()
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
        targets = expert_targets(owner_module(module.module), names, base_names.find, shape_of)
        if not targets:
            continue
        _check_expert_count(targets, declared)
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
            module.a_key, module.b_key, scale, transposed, LAYER, experts=target.experts
        )
        deltas.products.update(_products_by_tensor(target, product))
    return deltas


def _check_expert_count(targets: list[ExpertTarget], declared: int | None) -> None:
    """The base stores as many experts as its config.json declares.

    Raises:
        AdapterMismatchError: it does not.
    """
    for target in targets:
        if target.experts > 1 and declared not in (None, target.experts):
            raise AdapterMismatchError(
                f"{target.parameter!r} has {target.experts} experts in BASE's weights but "
                f"config.json declares {declared}: the checkpoint is incomplete or inconsistent"
            )


def _products_by_tensor(target: ExpertTarget, product: LoraProduct) -> dict[str, LoraProduct]:
    """The product for the fused tensor, or one per stored part of each expert."""
    if target.fused_key is not None:
        return {target.fused_key: product}
    products = {}
    for expert, keys in enumerate(target.part_keys):
        start = 0
        for key, rows in zip(keys, target.part_rows, strict=True):
            products[key] = dataclasses.replace(
                product, expert=expert, b_rows=(start, start + rows)
            )
            start += rows
    return products


def expert_lora_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int, experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of one expert of a LoRA on fused expert weights (PEFT ``lora.ParamWrapper``).

    PEFT's ``ParamWrapper.get_delta_weight`` reshapes A (r·E, in) to (E, r, in)
    and B (out, r·E) to (out, r, E): expert e takes the consecutive rows
    ``e·r:(e+1)·r`` of A and the interleaved columns ``e::E`` of B.

    Args:
        lora_a: A of every expert, (r·E, in), or just this expert's (r, in) rows.
        lora_b: B of every expert, (rows, r·E).
        expert / experts: e and E.

    Returns:
        (A_e (r, in), B_e (rows, r)), B_e contiguous.
    """
    rank = lora_b.shape[1] // experts
    if lora_a.shape[0] != rank:
        lora_a = lora_a[expert * rank : (expert + 1) * rank]
    return lora_a, lora_b[:, expert::experts].contiguous()


def read_factors(delta: LoraProduct, adapter: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of a parameter LoRA, as :func:`expert_lora_factors` takes them apart.

    For a fused (E, X, Y) weight (``expert`` None): A (r·E, in) and B (out, r·E)
    whole, taken apart one expert at a time by the caller. For one expert's weight:
    only that expert's rows of A (they are consecutive) and the rows of B this
    weight takes (``b_rows``), then its columns of B: (r, in) and (rows, r).
    """
    if delta.expert is None:
        return adapter.read_rows(delta.a_key), adapter.read_rows(delta.b_key)
    rank = adapter.shape(delta.a_key)[0] // delta.experts
    start = delta.expert * rank
    lora_a = adapter.read_rows(delta.a_key, start, start + rank)
    lora_b = adapter.read_rows(delta.b_key, *(delta.b_rows or (0, None)))
    return expert_lora_factors(lora_a, lora_b, delta.expert, delta.experts)
