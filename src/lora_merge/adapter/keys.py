"""What each tensor in a PEFT adapter file is, from its key alone.

PEFT's ``get_peft_model_state_dict`` saves keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (the adapter
name removed). The suffix says what the tensor is; the rest names the module
in the base model. The rules are a table, not a chain of ifs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lora_merge.errors import InvalidInputError

PEFT_PREFIX = "base_model.model."

# Where an in-memory PEFT state dict (``model.state_dict()`` rather than
# ``get_peft_model_state_dict``, as some training tools save) keeps the adapter
# name: ``X.lora_A.default.weight``, ``X.lora_embedding_A.default``,
# ``X.modules_to_save.default.weight``. Group 1 is the part before the name,
# group 2 the name, group 3 what follows it.
# Tensors of the other adapter types lora-merge merges (see lora_merge.plan.tuners):
# PEFT keeps them in ParameterDicts and saves them as ``X.<role>`` (``X.hada_w1_a``).
TUNER_ROLES: tuple[str, ...] = (
    "lora_E",  # AdaLoRA (beside lora_A and lora_B, which it saves without ".weight")
    "ia3_l",  # IA3
    *("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),  # LoHa
    *("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "vera_lambda_b",  # VeRA
    "vera_lambda_d",
)
# Tensors every module of a VeRA adapter shares, saved once as ``base_model.vera_A``.
SHARED_TUNER_ROLES = ("vera_A", "vera_B")
# OFT keeps its generator in a module: ``X.oft_R.weight``.
OFT_SUFFIX = ".oft_R.weight"
_ADAPTER_NAME_IN_KEY = re.compile(
    r"^(.*\.(?:lora_A|lora_B|lora_magnitude_vector|modules_to_save|oft_R))\.([^.]+)"
    r"(\.(?:weight|bias))$"
    r"|^(.*\.(?:lora_embedding_A|lora_embedding_B|trainable_tokens_delta|"
    + "|".join((*TUNER_ROLES, *SHARED_TUNER_ROLES))
    + r"))\.([^.]+)()$"
)

# suffix -> role of the tensor in its module. Longest suffixes first.
_LORA_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "B_bias"),
    (".lora_embedding_A", "embedding_A"),
    (".lora_embedding_B", "embedding_B"),
    # DoRA's magnitude vector m. PEFT saves it without ".weight"; a state dict
    # taken from the live model has the ".weight" of the DoraLinearLayer.
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    # loralib (microsoft/LoRA) saves its parameters bare; see adapter/loralib.py.
    (".lora_A", "A"),
    (".lora_B", "B"),
)
# PEFT's trainable tokens (``trainable_token_indices``): new values for some rows
# of an embedding, the row numbers being in adapter_config.json.
TRAINABLE_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
# A saved copy of a wrapped layer (e.g. a resized embedding PEFT stores with
# save_embedding_layers=True) replaces the base tensor of that module, and so
# does the trained copy of a modules_to_save layer. PEFT saves the latter as
# ``X.weight``, and, when the vocabulary was resized, also as
# ``X.modules_to_save.weight`` beside ``X.original_module.weight``, the
# untrained (resized) original, which a merge must not use.
_REPLACEMENT_INFIXES = (".base_layer.", ".modules_to_save.")
_UNTRAINED_ORIGINAL_INFIX = ".original_module."


# Names PEFT itself gives submodules of its wrappers; never an adapter's name.
_PEFT_MODULE_NAMES = frozenset({"original_module", "base_layer", "token_adapter"})


@dataclass
class LoraModuleKeys:
    """The adapter keys of one LoRA-wrapped module.

    Attributes:
        module: module name in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        a_key / b_key: keys of the down (A) and up (B) projections.
        bias_key: key of ``lora_B.bias`` (PEFT ``lora_bias=True``), if any.
        magnitude_key: key of DoRA's ``lora_magnitude_vector``, if the module is DoRA.
        is_embedding: stored as ``lora_embedding_A/B`` (an ``nn.Embedding`` target).
        dense: ``a_key`` holds the whole (out, in) delta, not a rank-r factor
            (combined adapters' ``*_full`` methods); ``b_key`` is then unused.
    """

    module: str
    a_key: str | None = None
    b_key: str | None = None
    bias_key: str | None = None
    magnitude_key: str | None = None
    is_embedding: bool = False
    dense: bool = False


@dataclass
class TunerModuleKeys:
    """The adapter keys of one module of an AdaLoRA, IA3, LoHa or LoKr adapter.

    Attributes:
        module: module name in the base model.
        tensors: role (one of :data:`TUNER_ROLES`, e.g. ``hada_w1_a``) -> adapter key.
    """

    module: str
    tensors: dict[str, str] = field(default_factory=dict)


@dataclass
class AdapterContents:
    """The adapter file's keys, sorted by what they do.

    Attributes:
        lora_modules: module name -> its LoRA keys.
        replacements: base tensor name (as the adapter names it) -> adapter key of
            a full tensor that replaces it (modules_to_save, saved base layers,
            trained biases).
        trainable_tokens: embedding module name -> adapter key of its
            ``trainable_tokens_delta`` (new values of some of its rows).
        tuner_modules: module name -> its tensors, for the other types lora-merge merges.
        shared_tuner_tensors: role -> key of a tensor every module shares (VeRA's A and B).
        base_layer_copies: names in ``replacements`` saved from a wrapped layer's
            ``base_layer`` (the model's own parameter, shared with whatever it is tied
            to), as opposed to a modules_to_save copy, which is the module's alone.
    """

    lora_modules: dict[str, LoraModuleKeys] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)
    trainable_tokens: dict[str, str] = field(default_factory=dict)
    base_layer_copies: set[str] = field(default_factory=set)
    tuner_modules: dict[str, TunerModuleKeys] = field(default_factory=dict)
    shared_tuner_tensors: dict[str, str] = field(default_factory=dict)


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.X`` -> ``X``; keys without the prefix are kept as they are."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def split_adapter_name(name: str) -> tuple[str, str | None]:
    """``X.lora_A.default.weight`` -> (``X.lora_A.weight``, ``"default"``); other names unchanged.

    PEFT's ``get_peft_model_state_dict`` removes the adapter name from every key;
    a raw ``state_dict()`` of a PeftModel keeps it.
    """
    match = _ADAPTER_NAME_IN_KEY.match(name)
    if match is None:
        return name, None
    head, adapter_name, tail = (
        match.groups()[:3] if match.group(1) is not None else match.groups()[3:]
    )
    if adapter_name in _PEFT_MODULE_NAMES:  # a wrapped module's own part, not an adapter
        return name, None
    return f"{head}{tail}", adapter_name


def adapter_key_name(key: str) -> str:
    """The name an adapter key gives its tensor: without ``base_model.model.`` nor an adapter name."""
    return split_adapter_name(strip_peft_prefix(key))[0]


def classify_adapter_keys(keys: list[str]) -> AdapterContents:
    """Sort adapter keys into LoRA modules and replacement tensors.

    Keys may lack the ``base_model.model.`` prefix (the planner matches names
    against the base's) and may carry one adapter name (``lora_A.default.weight``);
    a file with several adapter names is refused, as the merge would be ambiguous.

    Raises:
        InvalidInputError: a LoRA module lacks its A or B, or the file holds several
            adapters.
    """
    contents = AdapterContents()
    adapter_names: dict[str, str] = {}  # adapter name -> first key that carries it
    for key in keys:
        name, adapter_name = split_adapter_name(strip_peft_prefix(key))
        if adapter_name is not None:
            adapter_names.setdefault(adapter_name, key)
            if len(adapter_names) > 1:
                first, second = list(adapter_names.items())[:2]
                raise InvalidInputError(
                    f"adapter keys {first[1]!r} and {second[1]!r} belong to two adapters "
                    f"({first[0]!r} and {second[0]!r}); save one adapter per file (PEFT "
                    "save_pretrained(selected_adapters=[...])) and merge them one at a time"
                )
        if _UNTRAINED_ORIGINAL_INFIX in name:
            continue
        if name.endswith(TRAINABLE_TOKENS_SUFFIX):
            contents.trainable_tokens[name[: -len(TRAINABLE_TOKENS_SUFFIX)]] = key
            continue
        module_name, _, last = name.rpartition(".")
        if last in SHARED_TUNER_ROLES and module_name in ("", "base_model"):
            contents.shared_tuner_tensors[last] = key
            continue
        if name.endswith(OFT_SUFFIX):
            module_name, last = name.removesuffix(OFT_SUFFIX), "oft_R"
        if (last in TUNER_ROLES or last == "oft_R") and module_name:
            tuner = contents.tuner_modules.setdefault(module_name, TunerModuleKeys(module_name))
            tuner.tensors[last] = key
            continue
        role = next(((s, r) for s, r in _LORA_SUFFIXES if name.endswith(s)), None)
        if role is None:
            target = name
            for infix in _REPLACEMENT_INFIXES:
                target = target.replace(infix, ".")
            # X.modules_to_save.weight and X.weight are the same trained copy; the
            # explicit one wins whatever the order the file lists them in.
            if target not in contents.replacements or target != name:
                contents.replacements[target] = key
                if ".base_layer." in name:
                    contents.base_layer_copies.add(target)
                else:
                    contents.base_layer_copies.discard(target)
            continue
        suffix, kind = role
        module = name[: -len(suffix)]
        keys_of_module = contents.lora_modules.setdefault(module, LoraModuleKeys(module=module))
        if kind in ("A", "embedding_A"):
            keys_of_module.a_key = key
        elif kind in ("B", "embedding_B"):
            keys_of_module.b_key = key
        elif kind == "magnitude":
            keys_of_module.magnitude_key = key
        else:
            keys_of_module.bias_key = key
        keys_of_module.is_embedding = keys_of_module.is_embedding or kind.startswith("embedding")

    for lora_module in contents.lora_modules.values():
        if lora_module.a_key is None or lora_module.b_key is None:
            present = (
                lora_module.a_key
                or lora_module.b_key
                or lora_module.bias_key
                or lora_module.magnitude_key
            )
            raise InvalidInputError(
                f"adapter module {lora_module.module!r} has {present!r} but not both LoRA matrices "
                "(A and B); the adapter file is incomplete"
            )
    return contents


def as_adalora_modules(contents: AdapterContents) -> AdapterContents:
    """An AdaLoRA file's contents: each module's A and B joined to its ``lora_E``.

    AdaLoRA saves ``X.lora_A``, ``X.lora_B`` and ``X.lora_E`` (ParameterDicts, no
    ``.weight``): its A and B look like a LoRA pair, but its delta is
    ``B @ (A * E)``, a tuner's (see :mod:`lora_merge.plan.tuners.adalora`).
    """
    tuners = {
        name: TunerModuleKeys(name, dict(m.tensors)) for name, m in contents.tuner_modules.items()
    }
    for module in contents.lora_modules.values():
        tuner = tuners.setdefault(module.module, TunerModuleKeys(module.module))
        assert module.a_key is not None and module.b_key is not None
        tuner.tensors.update(lora_A=module.a_key, lora_B=module.b_key)
    return AdapterContents(
        replacements=contents.replacements,
        trainable_tokens=contents.trainable_tokens,
        base_layer_copies=contents.base_layer_copies,
        tuner_modules=tuners,
        shared_tuner_tensors=contents.shared_tuner_tensors,
    )
