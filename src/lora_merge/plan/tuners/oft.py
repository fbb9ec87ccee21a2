"""OFT (orthogonal fine-tuning): ``W·Rᵀ``, R block-diagonal, each block a Cayley transform.

Reproduces PEFT 0.21's OFT (``peft/tuners/oft/layer.py``): ``Linear.merge`` computes
``torch.mm(R, W.t()).t()`` (``Conv2d.merge`` the same on W viewed as
(out, in·k·k)), R being ``OFTRotationModule.get_weight()``:

- the saved generator (``oft_R.weight``, one row of b(b-1)/2 values per block, or
  one row for every block with ``block_share``), projected first with ``coft``
  (``_project_batch``: a block whose skew matrix has a Frobenius norm above
  ``eps / sqrt(blocks)`` is scaled back to that norm);
- each row made a skew-symmetric b x b matrix Q (``_pytorch_skew_symmetric``);
- ``_cayley_batch``: with ``use_cayley_neumann`` the truncated series
  ``I + 2Q + 2Q² + ... + 2Q^(m-2) + Q^(m-1)`` (m = ``num_cayley_neumann_terms``),
  else ``(I - Q)(I + Q)⁻¹`` (``torch.linalg.solve(I + Q, I - Q, left=False)``);
- ``_block_diagonal``: the blocks on R's diagonal.

``unmerge`` multiplies by ``inv(R)`` the same way: the merge undone, by R's
transpose where R is orthogonal (the exact Cayley form), by its inverse for the
truncated series, which is not quite orthogonal.

Shape rule (:func:`plan_oft`): R is as wide as a row of the weight: ``in`` for
``nn.Linear`` and for a 1x1 convolution (PEFT's OFT does not handle transformers'
Conv1D, whose rows are outputs). A convolution with a larger kernel is refused:
PEFT's forward rotates unfolded input patches and folds them back (``F.fold`` sums
overlapping patches), which its merge, ``W·Rᵀ`` over (out, in·k·k), does not
reproduce (measured: PEFT's merged model's outputs move by the outputs' own order).

Formula: the Cayley transform is not exact in float32 (PEFT's float32 R is off by
a few float32 units), so lora-merge builds R and ``W·Rᵀ`` in float64 and rounds
once: within half an ulp of the exact result, plus float64 noise. Block by block
(:func:`rotated_rows`), so memory holds the blocks, never a whole R.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora_merge.adapter.config import LoraAdapterConfig, OftSettings
from lora_merge.adapter.keys import TunerModuleKeys
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.io.reader import TensorSource
from lora_merge.plan.model import TunerUpdate
from lora_merge.plan.names import shape_mismatch

# torch is imported by the functions that compute values: a plan, made before
# torch is imported, needs none of it (issue 24).
if TYPE_CHECKING:
    import torch

TUNER = "oft"
FORMULA = (
    "OFT modules: W @ R.T with R block-diagonal, each block the Cayley transform of its generator"
)


def plan_oft(
    module: TunerModuleKeys,
    weight_key: str,
    weight_shape: tuple[int, ...],
    adapter: TensorSource,
    config: LoraAdapterConfig,
) -> TunerUpdate:
    """The update of one OFT module.

    Raises:
        AdapterMismatchError: the generator is not b(b-1)/2 values per block, or R is not as
            wide as the weight's rows.
    """
    key = module.tensors["oft_R"]
    shape = tuple(adapter.shape(key))
    if math.prod(weight_shape[2:]) > 1:
        raise InvalidInputError(
            f"OFT module {module.module!r} rotates a convolution with a {weight_shape[2:]} "
            "kernel: PEFT's OFT rotates the layer's unfolded input patches and folds them back, "
            "summing where they overlap, which no rotated weight reproduces (PEFT's own "
            "merge_and_unload changes such a model's outputs); lora-merge merges OFT into "
            "Linear and 1x1 convolutions only: keep this adapter unmerged"
        )
    settings = config.oft or OftSettings()
    block_size = block_size_of(shape[-1]) if len(shape) == 2 else None
    if block_size is None:
        raise AdapterMismatchError(
            f"adapter key {key!r} has shape {shape}: an OFT generator holds b(b-1)/2 values per "
            "block, for some block size b; the adapter file is inconsistent"
        )
    row_elements = math.prod(weight_shape[1:])
    blocks = row_elements // block_size if settings.block_share else shape[0]
    shared_fits = not settings.block_share or shape[0] == 1
    if len(weight_shape) < 2 or blocks * block_size != row_elements or not shared_fits:
        raise shape_mismatch(key, shape, weight_key, weight_shape)
    layer = "convolution" if len(weight_shape) > 2 else "linear"
    return TunerUpdate(TUNER, module.module, (("oft_R", key),), 1.0, layer, oft=settings)


def block_size_of(elements: int) -> int | None:
    """b with b(b-1)/2 = ``elements`` (PEFT's ``n_elements``), or None when there is none."""
    size = (1 + math.isqrt(1 + 8 * elements)) // 2
    return size if size * (size - 1) // 2 == elements and size > 1 else None


def rotation_blocks(generator: torch.Tensor, settings: OftSettings, blocks: int) -> torch.Tensor:
    """R's diagonal blocks (blocks, b, b), in the generator's dtype (float64 in the stream)."""
    import torch

    block_size = block_size_of(generator.shape[-1])
    assert block_size is not None
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    if settings.coft:
        generator = _project(generator, block_size, rows, cols, settings.eps)
    skew = _skew_symmetric(generator, block_size, rows, cols)
    if settings.use_cayley_neumann:
        rotation = _cayley_neumann(skew, settings.num_cayley_neumann_terms)
    else:
        identity = torch.eye(block_size, dtype=skew.dtype).expand_as(skew)
        rotation = torch.linalg.solve(identity + skew, identity - skew, left=False)
    return rotation.expand(blocks, -1, -1) if settings.block_share else rotation


def _skew_symmetric(
    generator: torch.Tensor, block_size: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """PEFT's ``_pytorch_skew_symmetric``: the upper triangle from the row, minus its transpose."""
    matrix = generator.new_zeros(generator.shape[0], block_size, block_size)
    matrix[:, rows, cols] = generator
    return matrix - matrix.transpose(-2, -1)


def _project(
    generator: torch.Tensor, block_size: int, rows: torch.Tensor, cols: torch.Tensor, eps: float
) -> torch.Tensor:
    """PEFT's ``_project_batch`` (COFT): each skew block's norm at most eps / sqrt(blocks)."""
    import torch

    skew = _skew_symmetric(generator, block_size, rows, cols)
    # As PEFT: ``eps * 1 / torch.sqrt(torch.tensor(blocks))`` (a float32 scalar).
    radius = (eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))).to(skew.dtype)
    norms = torch.norm(skew, dim=(1, 2), keepdim=True)
    projected = torch.where(norms <= radius, skew, radius * (skew / norms))
    return projected[:, rows, cols]


def _cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated series, its terms added in PEFT's order."""
    import torch

    rotation = torch.eye(skew.shape[-1], dtype=skew.dtype).repeat(skew.shape[0], 1, 1)
    if terms > 1:
        rotation.add_(skew, alpha=2.0)
        if terms > 2:
            power = torch.bmm(skew, skew)
            rotation.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, skew)
                rotation.add_(power, alpha=2.0)
            rotation.add_(torch.bmm(power, skew))
    return rotation


def unmerge_blocks(rotation: torch.Tensor) -> torch.Tensor:
    """inv(R)'s blocks: PEFT's unmerge multiplies by ``torch.linalg.inv(R)``."""
    import torch

    return torch.linalg.inv(rotation)


def rotated_rows(base_rows: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rows of ``W·Rᵀ`` (R's blocks given), in R's dtype, not yet rounded."""
    import torch

    blocks, block_size, _ = rotation.shape
    rows = base_rows.to(rotation.dtype).reshape(base_rows.shape[0], blocks, block_size)
    return torch.einsum("nkb,kcb->nkc", rows, rotation).reshape(base_rows.shape[0], -1)
