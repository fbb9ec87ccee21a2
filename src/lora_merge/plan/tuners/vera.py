"""VeRA: ``W + (Λb·B)(Λd·A)``, A and B random matrices every layer shares.

Reproduces PEFT's VeRA (``peft/tuners/vera/layer.py``, ``Linear.get_delta_weight``):
``transpose((lambda_b.unsqueeze(-1) * B[:out]) @ (lambda_d.unsqueeze(-1) * A[:, :in]),
fan_in_fan_out)``, added to the weight by ``Linear.merge``. A (r, in_max) and
B (out_max, r) are shared by every layer, each taking its top-left corner. PEFT
saves them as ``base_model.vera_A``/``vera_B`` with ``save_projection=True`` (its
default); otherwise ``VeraModel._init_vera_A_vera_B`` (``peft/tuners/vera/model.py``)
regenerates them, and so does :func:`regenerated_projections`: a CPU
``torch.Generator`` seeded with ``projection_prng_key`` draws A (r, in_max), then
B (out_max, r), each ``_kaiming_init``'s uniform on ±sqrt(3)·sqrt(2)/sqrt(fan_in), in
float32, in_max and out_max the largest of the adapted layers' sizes (``_find_dim``);
then, as ``_move_adapter_to_device_of_base_layer`` casts them to the base layer's
dtype before the float32 autocast, rounded to the base weights' dtype (a bf16 base:
bf16 values), which is what the adapter was trained with on such a base.

Shape rule (:func:`plan_vera`): lambda_b (out,), lambda_d (r,); the weight (out, in)
(``nn.Linear``) or (in, out) (transformers' Conv1D); A and B at least that large.

Formula (:func:`vera_delta`): PEFT's operations in PEFT's order, in the compute dtype
(float32 for 16-bit outputs: PEFT's bits), once per weight.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents, TunerModuleKeys
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.names import shape_mismatch
from lora_merge.plan.tuners.layout import stored_layout

# torch is imported by the functions that compute values: a plan, made before
# torch is imported, needs none of it (issue 24).
if TYPE_CHECKING:
    import torch

TUNER = "vera"
FORMULA = "VeRA modules: W + (lambda_b * B) @ (lambda_d * A), A and B shared by all modules"


def projection_sizes(
    contents: AdapterContents, adapter: TensorSource, in_features_of: dict[str, int]
) -> tuple[int, int, int]:
    """(r, in_max, out_max): the shared A's and B's sizes, as PEFT's ``_find_dim`` finds them.

    Args:
        contents: the adapter's modules.
        adapter: their tensors (shapes only).
        in_features_of: module name -> its layer's input size.
    """
    rank, in_max, out_max = 0, 0, 0
    for module in contents.tuner_modules.values():
        rank = max(rank, adapter.shape(module.tensors["vera_lambda_d"])[0])
        out_max = max(out_max, adapter.shape(module.tensors["vera_lambda_b"])[0])
        in_max = max(in_max, in_features_of[module.module])
    return rank, in_max, out_max


def plan_vera(
    module: TunerModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    contents: AdapterContents,
    config: LoraAdapterConfig,
    model_type: object,
) -> TunerUpdate:
    """The update of one VeRA module (A and B saved, or regenerated from the seed).

    Raises:
        InvalidInputError: a lambda vector is missing, or only one of A and B is saved.
        AdapterMismatchError: the vectors do not fit the weight, or A and B are too small.
    """
    missing = [r for r in ("vera_lambda_b", "vera_lambda_d") if r not in module.tensors]
    shared = contents.shared_tuner_tensors
    if missing or len(shared) == 1:
        raise InvalidInputError(
            f"VeRA module {module.module!r} lacks {', '.join(missing) or 'vera_A or vera_B'}: "
            "the adapter file is incomplete"
        )
    lambda_b, lambda_d = (module.tensors[r] for r in ("vera_lambda_b", "vera_lambda_d"))
    out_features, rank = adapter.shape(lambda_b)[0], adapter.shape(lambda_d)[0]
    in_features = math.prod(weight_shape) // out_features if weight_shape else 0
    layer = stored_layout(
        module.module, out_features, in_features, weight_shape, config, model_type
    )
    if layer is None:
        raise shape_mismatch(lambda_b, adapter.shape(lambda_b), weight_key, weight_shape)
    keys = [("vera_lambda_b", lambda_b), ("vera_lambda_d", lambda_d), *sorted(shared.items())]
    if shared:
        a_shape, b_shape = adapter.shape(shared["vera_A"]), adapter.shape(shared["vera_B"])
        if (
            a_shape[0] != rank
            or b_shape[1] != rank
            or a_shape[1] < in_features
            or (b_shape[0] < out_features)
        ):
            raise AdapterMismatchError(
                f"VeRA's shared A {a_shape} and B {b_shape} do not cover module "
                f"{module.module!r} (rank {rank}, {in_features} inputs, {out_features} outputs)"
            )
    return TunerUpdate(TUNER, module.module, tuple(keys), 1.0, layer)


def regenerated_projections(seed: int, sizes: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """A and B as ``VeraModel._init_vera_A_vera_B`` draws them (float32, CPU generator)."""
    import torch

    rank, in_max, out_max = sizes
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = {}
    for role, shape in (("vera_A", (rank, in_max)), ("vera_B", (out_max, rank))):
        # _kaiming_init: fan_in is the second dimension; gain sqrt(2).
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        drawn[role] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return drawn


def vera_delta(
    tensors: dict[str, torch.Tensor], update: TunerUpdate, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """PEFT's VeRA delta in the stored layout, from tensors in the compute dtype."""
    lambda_b, lambda_d = tensors["vera_lambda_b"], tensors["vera_lambda_d"]
    out_features = lambda_b.shape[0]
    in_features = math.prod(weight_shape) // out_features
    sliced_a = tensors["vera_A"][:, :in_features]
    sliced_b = tensors["vera_B"][:out_features, :]
    product = (lambda_b.unsqueeze(-1) * sliced_b) @ (lambda_d.unsqueeze(-1) * sliced_a)
    if update.scale != 1.0:  # --unmerge: -1, exact
        product = product * update.scale
    return product.T if update.layer == "conv1d" else product
