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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_merge.errors import AdapterMismatchError

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
        find: base keys a name may refer to (:meth:`BaseNames.find`).
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
