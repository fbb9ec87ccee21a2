"""``nn.Embedding``: ``W (vocab, dim) += scale * (B @ A).T``.

Reproduces PEFT's ``Embedding.get_delta_weight`` (``peft/tuners/lora/layer.py``):
``transpose(B @ A, True) * scaling``, and loralib's ``Embedding``. PEFT saves the
factors as ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r): the
other way round from a Linear's, so the product B @ A is (dim, vocab) and the
stored weight is its transpose. PEFT casts that delta to the weight's dtype
before adding it (two roundings); lora-merge rounds once, which is never further
from the exact sum.

Shape rule: the weight is (vocab, dim) with vocab A's columns and dim B's rows.
An adapter trained after the vocabulary was resized has more columns in A than
the base has rows: that is named, with what to do.

Formula: the same A and B as a Linear, laid out transposed: stored row t (token
t) of the delta is ``scale * B @ A[:, t]``.
"""

from __future__ import annotations

from lora_merge.errors import AdapterMismatchError
from lora_merge.plan.kinds.linear import read_factors
from lora_merge.plan.kinds.shapes import LoraShapes
from lora_merge.plan.model import LoraProduct

LAYER = "embedding"

__all__ = ["LAYER", "plan_embedding", "read_factors"]


def plan_embedding(shapes: LoraShapes, scale: float) -> LoraProduct:
    """The product for an embedding LoRA (``lora_embedding_A/B``).

    Raises:
        AdapterMismatchError: the factors do not fit the weight, or cover another
            vocabulary size.
    """
    weight_shape = shapes.weight_shape
    if len(weight_shape) != 2:
        raise shapes.mismatch()
    out_features, in_features = shapes.b_shape[0], shapes.a_shape[1]
    if weight_shape[1:] == (out_features,) and weight_shape[0] != in_features:
        raise AdapterMismatchError(
            f"adapter key {shapes.a_key!r} covers a vocabulary of {in_features} tokens but "
            f"base {shapes.weight_key!r} has {weight_shape[0]} rows: the adapter was trained "
            "after resizing the vocabulary; save it with the resized embeddings (PEFT "
            "save_embedding_layers=True or modules_to_save) or merge it into the resized base"
        )
    if weight_shape != (in_features, out_features):
        raise shapes.mismatch()
    return shapes.product(scale, transposed=True, layer=LAYER)
