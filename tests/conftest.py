"""Session-scoped, lazily built artefacts for the merge tests.

Everything is built under tmp_path_factory from configs: nothing is ever downloaded. Each
artefact (base checkpoint, adapter, lora-merge output, PEFT reference) is built at most once per
session, the first time a test asks for it.
"""

from __future__ import annotations

import os

# Must be set before transformers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from hub_cache import HubCache, build_hub_cache
from hypothesis import HealthCheck, settings
from merge_cases import MergeCase
from peft.tuners.lora import LoraLayer
from tiny_checkpoints import (
    load_peft_model,
    prompt_logits,
    save_tiny_base_checkpoint,
    save_tiny_lora_adapter,
    stable_seed,
)
from transformers import AutoModelForCausalLM

from lora_merge import MergeOptions, merge

# Hypothesis' defaults time each example (a 200 ms deadline, a health check on slow data
# generation): on a loaded or slow machine a correct test would fail. The properties are about
# results, not speed, so no example is timed. Loaded before any test module defines its settings,
# which inherit it.
settings.register_profile("lora-merge", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lora-merge")


@functools.cache
def bitsandbytes_missing() -> str | None:
    """Why bitsandbytes cannot be used here, or None when it loads."""
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception as err:  # not installed, or its native library fails to load
        return f"{type(err).__name__}: {err}"
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "bitsandbytes: makes or checks its quantized checkpoints with bitsandbytes, an optional "
        "dependency (no wheel for some platforms); skipped, with the reason, where it does not load",
    )


def pytest_collection_modifyitems(config, items):
    reason = bitsandbytes_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(
        reason=f"needs bitsandbytes, which does not load here ({reason}); "
        "the pure-torch dequantization is tested without it in test_quantized_torch_path.py"
    )
    for item in items:
        if item.get_closest_marker("bitsandbytes"):
            item.add_marker(skip)


@dataclass(frozen=True)
class CaseInputs:
    """The two input directories of a merge case."""

    base: Path
    adapter: Path


@dataclass(frozen=True)
class PeftModuleSettings:
    """What PEFT resolved for one LoRA module when loading the adapter from disk."""

    scale: float
    rank: int
    fan_in_fan_out: bool


@dataclass(frozen=True)
class PeftReference:
    """PEFT's view of a case, with the base loaded in the case's output dtype."""

    merged_state_dict: dict[str, torch.Tensor]  # merge_and_unload().state_dict()
    unmerged_logits: torch.Tensor  # prompt_logits() of the PeftModel, adapter not merged
    float64_logits: torch.Tensor  # the same unmerged PeftModel evaluated entirely in float64
    # keyed by module name, e.g. "model.layers.0.mlp.up_proj"
    module_settings: dict[str, PeftModuleSettings]


class _BuildOnce:
    """Calls `build(*args)` once per distinct arguments (a MergeCase counts by its id)."""

    def __init__(self, build):
        self._build = build
        self._built = {}

    def __call__(self, *args):
        key = tuple(arg.id if isinstance(arg, MergeCase) else arg for arg in args)
        if key not in self._built:
            self._built[key] = self._build(*args)
        return self._built[key]


@pytest.fixture(scope="session", autouse=True)
def _digest_cache_of_the_session(tmp_path_factory):
    """No run of the suite, session fixtures' merges included, writes lora-merge's digest
    cache (io/known_digests.py) into the real home: LORA_MERGE_CACHE points into pytest's
    temporary folder, for this process and the lora-merge processes tests start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_MERGE_CACHE", str(tmp_path_factory.mktemp("digest-cache-session")))
        yield


@pytest.fixture(autouse=True)
def _digest_cache_of_the_test(tmp_path_factory, monkeypatch):
    """Each test starts with an empty digest cache of its own: none sees another's digests."""
    monkeypatch.setenv("LORA_MERGE_CACHE", str(tmp_path_factory.mktemp("digest-cache")))


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory):
    """tiny_base_checkpoint(family, dtype) -> directory of a sharded random tiny checkpoint."""

    def build(family: str, dtype: torch.dtype) -> Path:
        directory = tmp_path_factory.mktemp(f"base-{family}-{str(dtype).removeprefix('torch.')}")
        return save_tiny_base_checkpoint(family, dtype, directory)

    return _BuildOnce(build)


@pytest.fixture(scope="session")
def case_inputs(tmp_path_factory, tiny_base_checkpoint):
    """case_inputs(case) -> the base checkpoint and the saved adapter of a merge case."""

    def build(case: MergeCase) -> CaseInputs:
        base = tiny_base_checkpoint(case.family, case.base_dtype)
        adapter = save_tiny_lora_adapter(
            base,
            case.base_dtype,
            case.lora_config(),
            tmp_path_factory.mktemp(f"adapter-{case.id}"),
            seed=stable_seed("adapter", case.id),
            safe_serialization=case.adapter_safe_serialization,
        )
        return CaseInputs(base=base, adapter=adapter)

    return _BuildOnce(build)


@pytest.fixture(scope="session")
def lora_merge_output(tmp_path_factory, case_inputs):
    """lora_merge_output(case) -> the directory written by lora_merge.merge() for the case."""

    def build(case: MergeCase) -> Path:
        inputs = case_inputs(case)
        out = tmp_path_factory.mktemp(f"merged-{case.id}") / "merged"
        merge(
            MergeOptions(
                base=inputs.base,
                adapter=inputs.adapter,
                out=out,
                dtype=case.output_dtype_option,
                max_shard_size=case.max_shard_size,
                overwrite=False,
                quiet=True,
            )
        )
        return out

    return _BuildOnce(build)


def unmerged_float64_logits(inputs: CaseInputs) -> torch.Tensor:
    """Logits of base + adapter with every weight (LoRA factors included) upcast to float64."""
    base_model = AutoModelForCausalLM.from_pretrained(inputs.base, dtype=torch.float64)
    peft_model = load_peft_model(base_model, inputs.adapter).double()
    return prompt_logits(peft_model, dtype=torch.float64)


@pytest.fixture(scope="session")
def peft_reference(case_inputs):
    """peft_reference(case) -> PEFT's unmerged logits, resolved settings and merged weights."""

    def build(case: MergeCase) -> PeftReference:
        inputs = case_inputs(case)
        base_model = AutoModelForCausalLM.from_pretrained(inputs.base, dtype=case.output_dtype)
        peft_model = load_peft_model(base_model, inputs.adapter)
        module_settings = {
            name.removeprefix("base_model.model."): PeftModuleSettings(
                scale=module.scaling["default"],
                rank=module.r["default"],
                fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
            )
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)
        }
        unmerged_logits = prompt_logits(peft_model)
        merged_model = peft_model.merge_and_unload()
        merged_state_dict = {
            name: tensor.detach().clone() for name, tensor in merged_model.state_dict().items()
        }
        return PeftReference(
            merged_state_dict=merged_state_dict,
            unmerged_logits=unmerged_logits,
            float64_logits=unmerged_float64_logits(inputs),
            module_settings=module_settings,
        )

    return _BuildOnce(build)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    """A temporary HF_HOME holding a base repo (two commits) and an adapter repo, as
    huggingface_hub lays a cache out, pointed at offline in this process and its children."""
    return build_hub_cache(tmp_path, monkeypatch)


@pytest.fixture
def handmade_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp_path/base`` and ``tmp_path/adapter``: the handmade base and its adapter."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


@pytest.fixture
def two_handmade_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The handmade base and two adapters of the same rank (so every --combine method applies)."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "first", adapter_tensors(seed=1))
    write_adapter(tmp_path / "second", adapter_tensors(seed=2))
    return tmp_path / "base", tmp_path / "first", tmp_path / "second"
