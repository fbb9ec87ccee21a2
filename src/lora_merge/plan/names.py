"""Which base tensor an adapter name means, and the one error for names that mean none.

Adapters name tensors as the model object that was trained saw them; the base
checkpoint may have been saved from another class, with other prefixes.
:class:`BaseNames` finds the one base tensor a name refers to, or says why it
cannot; :func:`check_every_name_matches` refuses, before any planning, the
adapter names that match nothing, listing a few of them at once; and
:func:`shape_mismatch` is the error for a name that matches a tensor it does not fit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from lora_merge.adapter.keys import AdapterContents
from lora_merge.errors import AdapterMismatchError

# Unmatched adapter keys an error message lists (the rest are counted).
MAX_KEYS_IN_ERROR = 3


class BaseNames:
    """Finds the base tensor an adapter name refers to.

    Adapters name tensors as the model object that was trained saw them; the
    base checkpoint may have been saved from a different class (``GPT2Model``
    vs ``GPT2LMHeadModel``: ``h.0...`` vs ``transformer.h.0...``), and tools
    other than PEFT may drop or keep prefixes. An exact match wins; otherwise
    one leading component may be dropped from the adapter's name or one of the
    base's own leading components added, provided exactly one base tensor
    matches that way (two would make the merge a guess).
    """

    def __init__(self, base_keys: Iterable[str]) -> None:
        self._keys = set(base_keys)
        self._prefixes = sorted({key.split(".", 1)[0] for key in self._keys if "." in key})

    def find(self, name: str) -> list[str]:
        """The base keys ``name`` may refer to: one, none, or several when it is ambiguous."""
        if name in self._keys:
            return [name]
        candidates = [name.split(".", 1)[1]] if "." in name else []
        candidates.extend(f"{prefix}.{name}" for prefix in self._prefixes)
        return [candidate for candidate in candidates if candidate in self._keys]

    def locate(self, name: str, adapter_key: str) -> str:
        """The base key for ``name``.

        Raises:
            AdapterMismatchError: no base tensor, or more than one, matches (names the adapter key).
        """
        found = self.find(name)
        if len(found) == 1:
            return found[0]
        if found:
            raise AdapterMismatchError(
                f"adapter key {adapter_key!r} targets {name!r}, which could be any of the base "
                f"tensors {found[:3]}; rename the adapter's keys to the base's full names "
                "(e.g. with the 'base_model.model.' prefix PEFT writes)"
            )
        raise self.unmatched_error([(adapter_key, name)])

    def closest(self, name: str, count: int = 3) -> list[str]:
        """The base keys that look most like ``name`` (for error messages)."""
        return difflib.get_close_matches(name, sorted(self._keys), n=count, cutoff=0.4)

    def unmatched_error(self, unmatched: list[tuple[str, str]]) -> AdapterMismatchError:
        """One error for adapter keys that match no base tensor: a few of them, and close base keys.

        Args:
            unmatched: (adapter key, the base name it was taken to mean) pairs.
        """
        adapter_key, name = unmatched[0]
        hint = "was this adapter trained on a different base model?"
        others = ""
        if len(unmatched) > 1:
            more = [key for key, _ in unmatched[1:MAX_KEYS_IN_ERROR]]
            others = f" ({len(unmatched)} keys match nothing; also {more})"
        closest = self.closest(name)
        near = f"; the closest base tensors are {closest}" if closest else ""
        return AdapterMismatchError(
            f"adapter key {adapter_key!r} targets {name!r}, which is not a tensor of the base"
            f"{others}{near}: {hint}"
        )


def check_every_name_matches(
    base_names: BaseNames, contents: AdapterContents, parameter_modules: set[str]
) -> None:
    """Refuse, listing a few of them, adapter names that match no base tensor.

    Args:
        parameter_modules: adapter modules planned as parameter LoRAs (no ``.weight``).

    Raises:
        AdapterMismatchError: some names match nothing; ambiguous names are
            reported later by :meth:`BaseNames.locate`.
    """
    wanted = [(key, name) for name, key in contents.replacements.items()]
    for module in contents.lora_modules.values():
        if module.module in parameter_modules:
            continue
        # (A LoRA bias is located later, beside its weight.)
        wanted.append((module.a_key or module.module, f"{module.module}.weight"))
    for tuner in contents.tuner_modules.values():  # AdaLoRA, IA3, LoHa, LoKr
        wanted.append((next(iter(tuner.tensors.values())), f"{tuner.module}.weight"))
    unmatched = [(key, name) for key, name in wanted if not base_names.find(name)]
    if unmatched:
        raise base_names.unmatched_error(unmatched)


def shape_mismatch(
    adapter_key: str, shape: tuple[int, ...], base_key: str, base_shape: tuple[int, ...]
) -> AdapterMismatchError:
    """The error for an adapter tensor that names a base tensor but does not fit its shape."""
    return AdapterMismatchError(
        f"adapter key {adapter_key!r} has shape {tuple(shape)} but base {base_key!r} is "
        f"{tuple(base_shape)}: was this adapter trained on a different base model?"
    )
