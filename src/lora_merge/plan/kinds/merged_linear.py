"""loralib's ``MergedLinear``: one LoRA over some of a fused layer's output groups.

Reproduces loralib's ``MergedLinear.merge_AB`` (microsoft/LoRA,
``loralib/layers.py``; see :mod:`lora_merge.adapter.loralib`): a fused qkv with
``enable_lora=[True, False, True]`` keeps A (r·k, in) and B (out/G·k, r) for the
k enabled of its G output groups, and its delta is
``zero_pad(conv1d(A, B, groups=k)) * alpha / r``: enabled group j (in order)
gets ``B[j·n:(j+1)·n] @ A[j·r:(j+1)·r]`` (n = out / G), disabled groups zeros,
transposed when ``fan_in_fan_out``.

Shape rule (:func:`plan_merged_linear`): A has a multiple k of the rank in rows,
B's rows are k equal groups, and the weight's output features are G such groups.
Which groups are enabled cannot be told from shapes unless all are: it comes
from ``--enable-lora``.

Formula (:func:`read_factors`): B spread over its groups' rows and its A
block's columns (:func:`expand_merged_linear_b`), so that a plain ``B @ A``
gives the same product (the extra terms are exact zeros, which change no sum).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_merge.adapter.loralib import LoralibSettings
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.architectures import is_conv1d_module
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import LoraProduct

# torch names types only: a plan, made before torch is imported, needs none of it
# (issue 24); the tensors come from the adapter's reader.
if TYPE_CHECKING:
    import torch

LAYER = "merged_linear"


def plan_merged_linear(
    shapes: LoraShapes, loralib: LoralibSettings, model_type: object
) -> LoraProduct:
    """A loralib ``MergedLinear``: A (r·k, in), B (out/G·k, r), k of G output groups enabled.

    Raises:
        AdapterMismatchError: the shapes are no MergedLinear of this rank on this weight.
        InvalidInputError: which groups are enabled cannot be told and ``--enable-lora`` is absent.
    """
    module, a_shape, b_shape = shapes.module, shapes.a_shape, shapes.b_shape
    rank = loralib.rank
    enabled, remainder = divmod(a_shape[0], rank) if len(a_shape) == 2 else (0, 1)
    if not enabled or remainder or len(b_shape) != 2 or b_shape[1] != rank or b_shape[0] % enabled:
        raise AdapterMismatchError(
            f"adapter module {module.module!r} has A {tuple(a_shape)} and B {tuple(b_shape)}: "
            f"neither a loralib Linear nor a MergedLinear of rank {rank}; check --rank"
        )
    transposed = _stores_transposed(shapes, b_shape[0] // enabled, model_type)
    groups = shapes.weight_shape[1 if transposed else 0] // (b_shape[0] // enabled)
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
        a_key=shapes.a_key,
        b_key=shapes.b_key,
        scale=loralib.alpha / rank,
        transposed=transposed,
        layer=LAYER,
        groups=enable_lora,
    )


def _stores_transposed(shapes: LoraShapes, group_rows: int, model_type: object) -> bool:
    """Whether the fused weight is stored (in, out) (``fan_in_fan_out``), from its shape.

    Raises:
        AdapterMismatchError: A's input features fit neither side, or the output side
            is no whole number of groups.
    """
    weight_shape, in_features = shapes.weight_shape, shapes.a_shape[1]
    orientations = []
    if len(weight_shape) == 2 and weight_shape[1] == in_features:
        orientations.append(False)
    if len(weight_shape) == 2 and weight_shape[0] == in_features:
        orientations.append(True)
    if len(orientations) == 2:  # square: fan_in_fan_out is the architecture's to say
        name = shapes.module.module
        known = is_conv1d_module(model_type if isinstance(model_type, str) else None, name)
        orientations = [bool(known)]
    if not orientations or weight_shape[int(orientations[0])] % group_rows:
        raise shapes.mismatch()
    return orientations[0]


def expand_merged_linear_b(lora_b: torch.Tensor, groups: tuple[bool, ...]) -> torch.Tensor:
    """B of a loralib ``MergedLinear`` as the (out, r·k) matrix whose product with A is its delta.

    Enabled group j (in order) gets ``B[j·n:(j+1)·n] @ A[j·r:(j+1)·r]``
    (n = out / len(groups)) and disabled groups get zeros: placing each B block at
    its group's rows and its A block's columns gives the same product with a plain
    matmul.

    Args:
        lora_b: (n·k, r), the enabled groups' rows stacked.
        groups: ``enable_lora``, k of them true.

    Returns:
        (n·len(groups), r·k), zeros outside the blocks.
    """
    rank, enabled = lora_b.shape[1], sum(groups)
    group_rows = lora_b.shape[0] // enabled
    full = lora_b.new_zeros((group_rows * len(groups), rank * enabled))
    block = 0
    for group, is_enabled in enumerate(groups):
        if is_enabled:
            rows = slice(group * group_rows, (group + 1) * group_rows)
            full[rows, block * rank : (block + 1) * rank] = lora_b[
                block * group_rows : (block + 1) * group_rows
            ]
            block += 1
    return full


def read_factors(delta: LoraProduct, adapter: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r·k, in) as stored and B spread over every group's rows (out, r·k)."""
    assert delta.groups is not None
    lora_b = expand_merged_linear_b(adapter.read_rows(delta.b_key), delta.groups)
    return adapter.read_rows(delta.a_key), lora_b
