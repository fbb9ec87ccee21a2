"""The vocabulary: replaced and resized embeddings, tied heads, trainable-token rows.

PEFT can replace whole tensors (``modules_to_save``, the embeddings it saves with
``save_embedding_layers``), possibly with more rows than the base's vocabulary;
it can replace some rows of an embedding (trainable tokens); and a LoRA or a
replacement on one of a tied embedding and head leaves the other as it was.
Here those are planned: which base tensor each replacement replaces and the new
vocabulary size (:func:`plan_replacements`), the rows trainable tokens replace
(:func:`plan_token_rows`), and whether the output's head is written apart and
untied (:func:`plan_tied_head`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_merge.adapter.config import LoraAdapterConfig
from lora_merge.adapter.keys import AdapterContents
from lora_merge.dtypes import DType
from lora_merge.errors import AdapterMismatchError, InvalidInputError
from lora_merge.inputs.resolve import BaseCheckpoint
from lora_merge.io.reader import TensorSource
from lora_merge.io.shard_writer import TensorSpec
from lora_merge.plan.architectures import (
    INPUT_EMBEDDING_SUFFIXES,
    TIED_HEAD_NAME,
    VOCAB_TENSOR_SUFFIXES,
)
from lora_merge.plan.model import Delta, MergePlan, PlannedTensor, TokenRows
from lora_merge.plan.names import BaseNames, shape_mismatch


@dataclass(frozen=True)
class TiedHead:
    """How the base's output head relates to its input embedding.

    Attributes:
        embedding: the input embedding the head is one parameter with, if tied
            (see :func:`tied_input_embedding`).
        stored: the base stores a head tensor of its own.
    """

    embedding: str | None
    stored: bool

    @classmethod
    def of(cls, base: BaseCheckpoint) -> TiedHead:
        """The base's head and embedding, from its config and its tensors."""
        return cls(tied_input_embedding(base), TIED_HEAD_NAME in base.tensors)

    @property
    def sources(self) -> dict[str, str]:
        """Names the adapter may target that the base holds under another name.

        A tied head is usually absent from the base; adapter keys may still target it.
        """
        return {TIED_HEAD_NAME: self.embedding} if self.embedding and not self.stored else {}


def tied_input_embedding(base: BaseCheckpoint) -> str | None:
    """The input embedding the output head is one parameter with, if the base is tied.

    Tied when config.json says ``tie_word_embeddings: true`` (transformers then
    ignores a stored head), or says nothing and the checkpoint stores no head.
    """
    declared = base.config.get("tie_word_embeddings")
    if declared is False or (declared is None and TIED_HEAD_NAME in base.tensors):
        return None
    return next((key for key in base.tensors if key.endswith(INPUT_EMBEDDING_SUFFIXES)), None)


@dataclass
class Replacements:
    """Base tensors replaced wholesale by adapter tensors.

    Attributes:
        keys: base key -> the adapter key of its new values.
        vocab_size: the new vocabulary size when they resize the embeddings, else None.
    """

    keys: dict[str, str]
    vocab_size: int | None


def plan_replacements(
    contents: AdapterContents,
    adapter: TensorSource,
    base_names: BaseNames,
    base_shape_of: Callable[[str], tuple[int, ...]],
    vocab_size: object,
    tie: TiedHead,
) -> Replacements:
    """The base tensor each full adapter tensor replaces, and the vocabulary they resize to.

    Raises:
        AdapterMismatchError: a replacement does not fit its tensor (other than by
            resizing the vocabulary), or two resize it differently.
    """
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
                raise shape_mismatch(adapter_key, shape, base_key, base_shape)
            if new_vocab_size not in (None, resized):
                raise AdapterMismatchError(
                    f"the adapter resizes the vocabulary to both {new_vocab_size} and {resized} rows; "
                    "the embedding and lm_head must agree"
                )
            new_vocab_size = resized
        replacements[base_key] = adapter_key
        if adapter_name in contents.base_layer_copies:
            shared_copies.add(base_key)
    if tie.embedding is not None:
        _share_tied_base_layer(replacements, shared_copies, tie.embedding)
    return Replacements(replacements, new_vocab_size)


def _resized_vocabulary(
    base_key: str, base_shape: tuple[int, ...], shape: tuple[int, ...], vocab_size: object
) -> int | None:
    """The new row count when a replacement only resizes an embedding or lm_head."""
    is_vocab_tensor = base_key.endswith(VOCAB_TENSOR_SUFFIXES) and base_shape[:1] == (vocab_size,)
    if is_vocab_tensor and len(shape) == len(base_shape) and shape[1:] == base_shape[1:]:
        return shape[0]
    return None


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


def plan_token_rows(
    contents: AdapterContents,
    base_names: BaseNames,
    config: LoraAdapterConfig,
    adapter: TensorSource,
    shape_of: Callable[[str], tuple[int, ...]],
) -> dict[str, TokenRows]:
    """Embedding base key -> the rows its trainable tokens replace (PEFT ``trainable_token_indices``).

    Raises:
        InvalidInputError: the config names no indices for a module with trainable tokens.
        AdapterMismatchError: the rows do not fit the embedding.
    """
    token_rows: dict[str, TokenRows] = {}
    for module_name, key in contents.trainable_tokens.items():
        embedding_key = base_names.locate(f"{module_name}.weight", key)
        token_rows[embedding_key] = _token_rows(
            module_name, key, config, adapter, shape_of(embedding_key)
        )
    return token_rows


def _token_rows(
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


def plan_tied_head(
    plan: MergePlan,
    tie: TiedHead,
    replacements: dict[str, str],
    deltas: dict[str, Delta],
    token_rows: dict[str, TokenRows],
    adapter: TensorSource,
    base: BaseCheckpoint,
    output_dtype: DType | None,
) -> None:
    """Write the head apart and untie it when the adapter changes one of a tied pair.

    Raises:
        AdapterMismatchError: the vocabulary is resized but the tied head cannot be.
    """
    if tie.embedding is not None and not tie.stored:
        _untie_if_changed(
            plan, tie.embedding, replacements, deltas, token_rows, adapter, base, output_dtype
        )
    elif (
        tie.stored
        and base.config.get("tie_word_embeddings") is not False
        and any(
            key in replacements or key in deltas or key in token_rows
            for key in base.tensors
            if key == TIED_HEAD_NAME or key.endswith(INPUT_EMBEDDING_SUFFIXES)
        )
    ):
        # Both tensors are stored, but transformers would tie them on load (when
        # config.json says so, or leaves it to a class default that may) and
        # overwrite the head with the changed embedding, or the reverse.
        plan.config_updates["tie_word_embeddings"] = False


def _untie_if_changed(
    plan: MergePlan,
    embedding: str,
    replacements: dict[str, str],
    deltas: dict[str, Delta],
    token_rows: dict[str, TokenRows],
    adapter: TensorSource,
    base: BaseCheckpoint,
    output_dtype: DType | None,
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
