"""What went into a merge, recorded in OUT: a model card and safetensors metadata.

OUT's ``README.md`` is a model card the Hub understands (YAML front matter with
``base_model``, ``base_model_relation``, ``library_name`` and ``tags``) whose
body says what was merged: the inputs (Hub repo and commit, or the path given),
the sha256 of every input file (:mod:`lora_merge.finish.input_hashes`), the
scales, the arithmetic, the dtype, the lora-merge version and the command line.
Each shard's header records the same in a few ``lora_merge.*`` keys. Nothing
here depends on the clock or the host, so two runs with the same inputs and
options write the same bytes.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_merge._version import __version__
from lora_merge.adapter.recipe import CombineRecipe
from lora_merge.compute.arithmetic import UNMERGE_ARITHMETIC, merge_arithmetic
from lora_merge.dtypes import DType
from lora_merge.finish.folder import DTYPE_NAME_IN_CONFIG
from lora_merge.finish.input_hashes import InputFile
from lora_merge.finish.shard_metadata import InputIdentity, shard_metadata_of
from lora_merge.inputs.resolve import AdapterFolder, BaseCheckpoint
from lora_merge.io.hub_names import REPOCARD_NAME
from lora_merge.options.values import SaveMethod
from lora_merge.plan.model import MergePlan
from lora_merge.plan.tuners.rows import TUNER_NAMES, tuner_arithmetic

HUB_URL = "https://huggingface.co"
_NAMESPACED_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class MergeRecord:
    """Everything the card states besides the file hashes.

    Attributes:
        base / adapter: the inputs.
        declared_base: the Hub id to list as ``base_model`` (None: not known).
        method: the arithmetic, one line.
        scales: distinct LoRA scales, formatted, and how many modules use each.
        lora_modules_by_layer: modules merged per layer kind.
        output_dtype: the dtype written, or the dtypes each tensor kept (with how many).
        version: lora-merge's version.
        command: the command line, or None for a Python API call.
        other_adapters: the further adapters combined with ``adapter`` (``--combine``).
        adapter_type: PEFT's name of the adapter's type (LoRA, AdaLoRA, IA3, ...).
    """

    base: InputIdentity
    adapter: InputIdentity
    declared_base: str | None
    method: str
    scales: Mapping[str, int]
    lora_modules_by_layer: Mapping[str, int]
    output_dtype: str
    version: str
    command: str | None
    other_adapters: tuple[InputIdentity, ...] = ()
    adapter_type: str = "LoRA"


def declared_base_model(
    base: InputIdentity, adapter_base: str | None, mismatch: bool
) -> str | None:
    """The Hub id the card names as ``base_model``.

    BASE's own repo id when it came from the Hub; otherwise the adapter's
    ``base_model_name_or_path`` when it is an ``org/name`` id that does not exist
    as a local path and the run did not warn that it names another model.
    """
    if base.repo_id:
        return base.repo_id
    if (
        adapter_base
        and not mismatch
        and _NAMESPACED_REPO_ID.fullmatch(adapter_base)
        and not os.path.exists(adapter_base)
    ):
        return adapter_base
    return None


def merge_record(
    base_spec: str,
    base: BaseCheckpoint,
    adapters: Sequence[tuple[str, AdapterFolder]],
    plan: MergePlan,
    *,
    adapter_base: str | None,
    mismatch: bool,
    unmerge: bool,
    recipe: CombineRecipe | None,
    save_method: SaveMethod,
    output_dtype: DType | None,
    command: str | None,
    initial_state: str | None = None,
) -> MergeRecord:
    """What OUT's model card and shard metadata say about this merge.

    With several adapters the card's adapter is the first; the method line
    names them all and how they were combined.

    Args:
        base_spec: BASE as the user gave it; ``base`` is what it resolved to.
        adapters: each ADAPTER as given, with its resolved folder.
        plan: the merge plan.
        adapter_base: the first adapter config's ``base_model_name_or_path``.
        mismatch: whether the run warned that the adapter names another base.
        unmerge: whether the run subtracts the adapter (``--unmerge``).
        recipe: how several adapters are combined, or None.
        save_method: ``merged_16bit``, ``merged_4bit``, ``merged_native`` or ``lora``.
        output_dtype: the dtype written, or None when each tensor keeps its own.
        command: the command line, or None for a Python API call.
        initial_state: how a base-changing initialisation (PiSSA...) was handled, or None.
    """
    base_identity = InputIdentity.of("base", base_spec, base.folder)
    identities = [InputIdentity.of("adapter", spec, folder.folder) for spec, folder in adapters]
    method = merge_arithmetic(any(p.magnitude_key for p in plan.lora_products))
    unmerge_method = UNMERGE_ARITHMETIC
    tuners = sorted({u.tuner for u in plan.tuner_updates})
    adapter_type = "LoRA"
    if tuners:  # AdaLoRA, IA3, LoHa, LoKr, OFT, VeRA: their own formula
        adapter_type = TUNER_NAMES[tuners[0]]
        method = tuner_arithmetic(tuners)
        unmerge_method = (
            f"--unmerge (each update undone: IA3 divides, LoHa/LoKr subtract): {method}"
        )
    if recipe is not None:
        method += (
            f"; B @ A is the combination of {', '.join(spec for spec, _ in adapters)} by "
            f"--combine {recipe.method_name}, weights "
            f"{','.join(f'{w:g}' for w in recipe.weights)}"
        )
    if initial_state is not None:
        method += f"; {initial_state}"
    quantization = next((t.as_trained for t in plan.tensors if t.as_trained), None)
    if quantization is not None:  # --qlora-base
        method += (
            f"; --qlora-base: W is dequant(quant(W)) of BASE's Linear weights in "
            f"{quantization.describe()}, as bitsandbytes quantizes and dequantizes them "
            "(what QLoRA training saw)"
        )
    return MergeRecord(
        base=base_identity,
        adapter=identities[0],
        declared_base=declared_base_model(base_identity, adapter_base, mismatch=mismatch),
        method=describe_arithmetic(unmerge_method if unmerge else method, base, save_method),
        scales={f"{scale:g}": n for scale, n in sorted(plan.module_scales.items())},
        lora_modules_by_layer=plan.lora_modules_by_layer,
        output_dtype=(
            DTYPE_NAME_IN_CONFIG[output_dtype]
            if output_dtype is not None
            else f"{dtypes_written(plan)} (--dtype auto: each tensor's own)"
        ),
        version=__version__,
        command=command,
        other_adapters=tuple(identities[1:]),
        adapter_type=adapter_type,
    )


def dtypes_written(plan: MergePlan) -> str:
    """The dtypes of the output's tensors, most tensors first: ``bfloat16 (290), float32
    (3)``. A quantized base's weights count in the dtype they are written in (bfloat16
    dequantized, or the base's own FP8 for ``merged_native``)."""
    counts = Counter(tensor.spec.dtype.torch_name for tensor in plan.tensors)
    return ", ".join(f"{name} ({count})" for name, count in counts.most_common())


def shard_metadata(record: MergeRecord) -> dict[str, str]:
    """The ``__metadata__`` of every output shard: the format plus a few provenance keys."""
    return shard_metadata_of(record.base, record.adapter, record.method, record.version)


def write_model_card(folder: Path, record: MergeRecord, files: Sequence[InputFile]) -> None:
    """Write OUT's ``README.md`` (front matter for the Hub, then what was merged)."""
    (folder / REPOCARD_NAME).write_text(model_card(record, files), encoding="utf-8")


def model_card(record: MergeRecord, files: Sequence[InputFile]) -> str:
    """The model card text."""
    front_matter = []
    if record.declared_base:
        front_matter += ["base_model:", f"- {_yaml_string(record.declared_base)}"]
        # One base and no adapter tag: the Hub lists this model as a fine-tune of it.
        front_matter.append("base_model_relation: finetune")
    front_matter += ["library_name: transformers", "tags:", "- lora-merge", "- merged-lora"]

    layers = ", ".join(f"{n} {kind}" for kind, n in sorted(record.lora_modules_by_layer.items()))
    scales = ", ".join(f"{scale} ({n} modules)" for scale, n in sorted(record.scales.items()))
    rows = [
        ("base", _input_cell(record.base)),
        ("adapter 1" if record.other_adapters else "adapter", _input_cell(record.adapter)),
        *(
            (f"adapter {number}", _input_cell(other))
            for number, other in enumerate(record.other_adapters, start=2)
        ),
        ("merge", record.method),
        ("LoRA modules", f"{sum(record.lora_modules_by_layer.values())} ({layers or 'none'})"),
        ("scales", scales or "none"),
        ("output dtype", record.output_dtype),
        ("lora-merge", record.version),
    ]
    lines = ["---", *front_matter, "---", "", "# Merged model", ""]
    adapters = [_input_link(a) for a in (record.adapter, *record.other_adapters)]
    subject = (
        f"The {record.adapter_type} adapter {adapters[0]}"
        if len(adapters) == 1
        else f"The LoRA adapters {', '.join(adapters)}, combined,"
    )
    lines.append(
        f"{subject} merged into "
        f"{_input_link(record.base)} with lora-merge {record.version}: a standalone "
        "model that loads without PEFT."
    )
    lines += ["", "## How it was made", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    lines += [
        "",
        "Command:",
        "",
        "```",
        record.command or "(lora_merge.merge, the Python API)",
        "```",
    ]
    lines += ["", "## Input files", "", "| input | file | bytes | sha256 |", "|---|---|---|---|"]
    lines += [
        f"| {f.role} | `{_cell(f.name)}` | {f.size} | "
        f"{f'`{f.sha256}`' if f.sha256 else 'not computed (--no-hash-inputs)'} |"
        for f in files
    ]
    return "\n".join(lines) + "\n"


def describe_arithmetic(method: str, base: BaseCheckpoint, save_method: SaveMethod) -> str:
    """The model card's description of the arithmetic, quantization included."""
    if base.quantization is not None:
        method += (
            f"; W dequantized from BASE's {base.quantization.describe()} weights "
            "exactly as the format's reference decoder dequantizes them"
        )
    if save_method is SaveMethod.MERGED_4BIT:
        method += "; then re-quantized to 4 bits with bitsandbytes (a second rounding)"
    elif save_method is SaveMethod.MERGED_NATIVE:
        method += "; then re-quantized in BASE's own format (a second rounding)"
    return method


def _input_cell(source: InputIdentity) -> str:
    if source.repo_id:
        return f"`{source.repo_id}` at commit `{source.commit}`"
    return f"`{source.spec}` (local folder)"


def _input_link(source: InputIdentity) -> str:
    if source.repo_id:
        return f"[{source.repo_id}]({HUB_URL}/{source.repo_id})"
    return f"`{source.spec}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml_string(text: str) -> str:
    """A YAML scalar for ``text``: a JSON string is a valid double-quoted YAML string."""
    return json.dumps(text)
