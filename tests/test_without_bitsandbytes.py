"""lora-merge where bitsandbytes is missing or broken, through the installed CLI.

bitsandbytes has no wheel for some platforms (Intel Macs, macOS before 14,
Linux on other CPUs), so it is a dependency only where it has one, and an
installed one can fail to load. Each run here starts the installed
``lora-merge`` with a ``sitecustomize`` bootstrap (on PYTHONPATH) that decides
what ``import bitsandbytes`` does in that process and logs every attempt:

- ``missing``: the import raises ModuleNotFoundError, as when it is not installed;
- ``broken-import``: it raises OSError, as a native library that fails to load does;
- ``broken-call``: the real bitsandbytes loads, but its dequantization kernels raise
  OSError when called;
- ``spy``: the real bitsandbytes, its kernels logged when called.

lora-merge dequantizes quantized bases with its own kernels
(lora_merge.compute.dequantize) and never imports bitsandbytes for that, so in
every mode a merge must say nothing about it and write the same bytes. The
oracles: for a 16-bit base, the float64 merge of merge_oracle; for a quantized
base, the merge of a plain base holding bitsandbytes' own dequantization of
each weight (its kernels, called here), byte for byte.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import write_adapter, write_base
from merge_oracle import (
    FLOAT32_UNIT_ROUNDOFF,
    expected_merged_checkpoint,
    read_safetensors_directory,
    ulp,
)
from merge_process import LORA_MERGE
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from safetensors.torch import save_file

EXIT_INVALID_INPUT = 4
# Small enough that every weight is dequantized in several row tiles, most of them starting
# in the middle of a quantization block.
TILED_MAX_MEMORY = "4KB"
BROKEN_LIBRARY = "libbitsandbytes_cpu.so: cannot open shared object file: No such file"
BROKEN_KERNEL = "bitsandbytes native call failed"

BOOTSTRAP = f'''
"""What `import bitsandbytes` does in this process (tests/test_without_bitsandbytes.py)."""
import atexit
import importlib.abc
import importlib.machinery
import os
import sys

MODE = os.environ["LORA_MERGE_TEST_BITSANDBYTES"]
LOG = os.environ["LORA_MERGE_TEST_BITSANDBYTES_LOG"]
KERNELS = ("dequantize_4bit", "dequantize_blockwise", "int8_vectorwise_dequant")


def note(event):
    with open(LOG, "a") as log:
        log.write(event + "\\n")


class BrokenLibrary(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError({BROKEN_LIBRARY!r})


class Bitsandbytes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] != "bitsandbytes":
            return None
        note("import " + name)
        if MODE == "missing":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        if MODE == "broken-import":
            return importlib.machinery.ModuleSpec(name, BrokenLibrary())
        return None  # the real one


def spied(name, kernel):
    def call(*args, **kwargs):
        note("call " + name)
        if MODE == "broken-call":
            raise OSError({BROKEN_KERNEL!r})
        return kernel(*args, **kwargs)

    return call


def note_modules():
    note("modules " + " ".join(sorted({{name.partition(".")[0] for name in sys.modules}})))


note("bootstrap " + MODE)
atexit.register(note_modules)
sys.meta_path.insert(0, Bitsandbytes())
if MODE in ("spy", "broken-call"):
    import logging

    # lora-merge silences this import's log lines when it imports bitsandbytes itself.
    logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)
    import bitsandbytes.functional

    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)

    for name in KERNELS:
        setattr(bitsandbytes.functional, name, spied(name, getattr(bitsandbytes.functional, name)))
'''


@dataclass(frozen=True)
class Run:
    """A finished lora-merge process and what its bootstrap saw."""

    result: subprocess.CompletedProcess[str]
    events: list[str]  # "import NAME" and "call KERNEL", in order
    modules: set[str]  # the top-level modules it had imported when it exited


def run_cli(tmp_path: Path, mode: str, *args: object) -> Run:
    """Run the installed lora-merge with bitsandbytes in ``mode``."""
    bootstrap = tmp_path / f"bootstrap-{mode}"
    bootstrap.mkdir(exist_ok=True)
    (bootstrap / "sitecustomize.py").write_text(BOOTSTRAP)
    log = bootstrap / "log.txt"
    log.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(bootstrap), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["LORA_MERGE_TEST_BITSANDBYTES"] = mode
    env["LORA_MERGE_TEST_BITSANDBYTES_LOG"] = str(log)
    result = subprocess.run(
        [LORA_MERGE, *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    events = log.read_text().splitlines() if log.exists() else []
    # Without these lines the bootstrap did not run and the test would prove nothing.
    assert events[:1] == [f"bootstrap {mode}"], (events, result.stderr)
    assert events[-1].startswith("modules "), (events, result.stderr)
    return Run(result, events[1:-1], set(events[-1].split()[1:]))


def import_bitsandbytes_functional():
    return pytest.importorskip(
        "bitsandbytes.functional",
        reason="bitsandbytes (not installed or not loading here) writes the quantized base and "
        "gives the reference dequantization",
    )


def runtime_distributions(environment: dict[str, str]) -> set[str]:
    """lora-merge and everything its installed metadata pulls in, for ``environment``'s
    markers: what ``pip install lora-merge`` installs there (no extras)."""
    from importlib.metadata import PackageNotFoundError, requires

    found: set[str] = set()
    wanted = ["lora-merge"]
    while wanted:
        name = canonicalize_name(wanted.pop())
        if name in found:
            continue
        found.add(name)
        try:
            texts = requires(name) or []
        except PackageNotFoundError:  # wanted only by a marker this machine does not match
            continue
        for requirement in map(Requirement, texts):
            marker = requirement.marker
            if marker is None or marker.evaluate({**environment, "extra": ""}):
                wanted.append(requirement.name)
    return found


def assert_installed_without_bitsandbytes(modules: set[str]) -> None:
    """Every library a run imported is installed by ``pip install lora-merge`` on a Linux
    machine whose CPU bitsandbytes has no wheel for (this machine, but ppc64le): a library
    that came only with bitsandbytes (numpy did) is missing there and crashes the merge."""
    from importlib.metadata import packages_distributions

    assert "bitsandbytes" not in modules
    installed = runtime_distributions({"platform_machine": "ppc64le"})
    assert "bitsandbytes" not in installed
    by_module = packages_distributions()
    missing = {
        module: by_module[module]
        for module in modules
        if module in by_module
        and not {canonicalize_name(name) for name in by_module[module]} & installed
    }
    assert missing == {}, "imported, but installed only with bitsandbytes or an extra"


@pytest.fixture(scope="module")
def inputs_16bit(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sixteen-bit")
    write_base(root / "base", shards=2)
    write_adapter(root / "adapter")
    return root / "base", root / "adapter"


@pytest.mark.parametrize("mode", ["missing", "broken-import"])
def test_a_16bit_base_merges_without_ever_importing_bitsandbytes(inputs_16bit, tmp_path, mode):
    """A bf16 base needs no bitsandbytes: the merge never tries to import it, says nothing
    about it, and every element is the float64 merge rounded once (within the error of the
    float32 evaluation: rank + 2 roundings of the magnitudes, merge_oracle's bound)."""
    base, adapter = inputs_16bit
    out = tmp_path / "out"
    run = run_cli(tmp_path, mode, base, adapter, out)
    assert run.result.returncode == 0, run.result.stderr
    assert run.result.stderr == ""
    assert run.events == []  # not even an attempt to import bitsandbytes
    assert_installed_without_bitsandbytes(run.modules)

    merged = read_safetensors_directory(out)
    expected = expected_merged_checkpoint(base, adapter)
    assert sorted(merged) == sorted(expected)
    adapted = 0
    for name, expectation in expected.items():
        output = merged[name]
        if expectation.lora is None:
            assert torch.equal(output, expectation.source), name
            continue
        adapted += 1
        error = (output.double() - expectation.exact).abs()
        bound = 0.5 * ulp(output, output.dtype) + expectation.rounding_error_bound(
            FLOAT32_UNIT_ROUNDOFF
        )
        assert (error <= bound).all(), name
    assert adapted == 4  # q_proj and v_proj in two layers


def _write_int8_base(source: Path, target: Path, functional) -> Path:
    """``source``'s projections in LLM.int8 as transformers saves them (weight, SCB, format)."""
    target.mkdir()
    tensors = {}
    for name, tensor in read_safetensors_directory(source).items():
        if name.endswith("_proj.weight"):
            codes, row_scales, _ = functional.int8_vectorwise_quant(tensor.to(torch.float16))
            tensors[name] = codes
            tensors[name.replace(".weight", ".SCB")] = row_scales
            tensors[f"{name}_format"] = torch.tensor([0], dtype=torch.uint8)
        else:
            tensors[name] = tensor
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def quantized_bases(inputs_16bit, tmp_path_factory) -> dict[str, Path]:
    functional = import_bitsandbytes_functional()
    from bnb_checkpoints import save_bitsandbytes_4bit_checkpoint

    base, _ = inputs_16bit
    root = tmp_path_factory.mktemp("quantized")
    return {
        # double quantization: dequantize_blockwise (the absmax) before dequantize_4bit
        "nf4-double-64": save_bitsandbytes_4bit_checkpoint(
            base, root / "nf4-double-64", quant_type="nf4", double_quant=True, blocksize=64
        ),
        "int8": _write_int8_base(base, root / "int8", functional),
    }


def _dequantized_by_bitsandbytes(quantized: Path, target: Path, functional) -> Path:
    """``quantized`` as a plain base: every quantized weight dequantized by bitsandbytes'
    own kernels (``dequantize_4bit``, with ``dequantize_blockwise`` for double quantization;
    ``int8_vectorwise_dequant``), every other tensor as stored."""
    stored = read_safetensors_directory(quantized)
    plain: dict[str, torch.Tensor] = {}
    auxiliary: set[str] = set()
    marker = ".quant_state.bitsandbytes__"
    for name, tensor in stored.items():
        if marker in name:
            weight = name.partition(marker)[0]
            pieces = {
                key.removeprefix(f"{weight}."): value
                for key, value in stored.items()
                if key.startswith(f"{weight}.")
            }
            auxiliary.update(f"{weight}.{key}" for key in pieces)
            state = functional.QuantState.from_dict(pieces, device=torch.device("cpu"))
            # One flat run: bitsandbytes' CPU kernel misreads blocks that span rows of a 2-D
            # shape (see tests/test_gpu_quantized.py); its values are the format's when flat.
            flat = copy.copy(state)
            flat.shape = torch.Size([math.prod(state.shape)])
            plain[weight] = functional.dequantize_4bit(stored[weight], flat).reshape(state.shape)
        elif name.endswith(".SCB"):
            weight = name.removesuffix(".SCB") + ".weight"
            auxiliary.update({name, f"{weight}_format"})
            plain[weight] = functional.int8_vectorwise_dequant(stored[weight], tensor)
    plain.update({n: t for n, t in stored.items() if n not in plain and n not in auxiliary})
    target.mkdir()
    save_file(plain, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def reference_outputs(quantized_bases, inputs_16bit, tmp_path_factory) -> dict[str, Path]:
    """Each quantized base dequantized by bitsandbytes' own kernels into a plain base, and
    that base merged: what merging the quantized base must write, tensor by tensor (the merge
    rounds ``dequant(W) + scale * B @ A`` once, from the same float32 values)."""
    functional = import_bitsandbytes_functional()
    _, adapter = inputs_16bit
    root = tmp_path_factory.mktemp("reference")
    outputs = {}
    for case, base in quantized_bases.items():
        plain = _dequantized_by_bitsandbytes(base, root / f"{case}-plain", functional)
        out = root / case
        run = run_cli(root, "missing", plain, adapter, out, *REFERENCE_FLAGS)
        assert run.result.returncode == 0, run.result.stderr
        outputs[case] = out
    return outputs


# The quantized bases name their dtype in quantization_config; the plain ones in their tensors.
REFERENCE_FLAGS = ("--max-memory", TILED_MAX_MEMORY, "--dtype", "bf16")


@pytest.mark.parametrize("case", ["int8", "nf4-double-64"])
@pytest.mark.parametrize("mode", ["spy", "missing", "broken-import", "broken-call"])
def test_a_quantized_base_merges_without_bitsandbytes_to_its_bytes(
    quantized_bases, reference_outputs, inputs_16bit, tmp_path, mode, case
):
    """A quantized base is dequantized by lora-merge's own kernels, whether bitsandbytes
    works, is missing or is broken: the merge never imports it (nor calls its kernels where
    something else did), says nothing about it, and writes exactly the bytes of the merge
    of bitsandbytes' own dequantization, tensor by tensor."""
    _, adapter = inputs_16bit
    out = tmp_path / "out"
    run = run_cli(tmp_path, mode, quantized_bases[case], adapter, out, *REFERENCE_FLAGS)
    result = run.result
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if mode in ("missing", "broken-import"):
        assert run.events == []  # not even an attempt to import bitsandbytes
        assert_installed_without_bitsandbytes(run.modules)
    else:  # the bootstrap imported the real one; lora-merge left its kernels alone
        assert not [event for event in run.events if event.startswith("call ")], run.events
    assert tensor_bytes(out) == tensor_bytes(reference_outputs[case])


def tensor_bytes(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """Every tensor of a merged model: dtype, shape and raw bytes (the files themselves
    differ in their metadata, which names the base, and in the order of the tensors)."""
    return {
        name: (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, t in read_safetensors_directory(folder).items()
    }


@pytest.mark.parametrize("mode", ["missing", "broken-import"])
def test_merged_4bit_without_bitsandbytes_is_refused_before_any_work(inputs_16bit, tmp_path, mode):
    """merged_4bit quantizes with bitsandbytes; without it the run (and its dry run, which
    would otherwise promise a run that cannot finish) is refused in one line that says why,
    before OUT or a staging folder exists."""
    base, adapter = inputs_16bit
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    for extra in ([], ["--dry-run"]):
        result = run_cli(
            tmp_path, mode, base, adapter, out, "--save-method", "merged_4bit", *extra
        ).result
        assert result.returncode == EXIT_INVALID_INPUT, (extra, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("lora-merge: error: --save-method merged_4bit")
        assert "pip install bitsandbytes" in lines[0]
        why = "not installed" if mode == "missing" else f"OSError: {BROKEN_LIBRARY}"
        assert why in lines[0]
        assert list(work.iterdir()) == []


# PyPI's bitsandbytes 0.50.2 wheels: manylinux_2_24 x86_64 and aarch64, win_amd64, win_arm64,
# macosx_14_0_arm64; 0.46 (our lower bound) has the first three only. A default install must
# never need a wheel that does not exist, so only those three get it without the extra.
PLATFORMS = {
    ("linux", "x86_64"): True,
    ("linux", "aarch64"): True,
    ("win32", "AMD64"): True,
    ("win32", "ARM64"): False,
    ("darwin", "arm64"): False,  # wheels for macOS 14+ only; a marker cannot see the version
    ("darwin", "x86_64"): False,
    ("linux", "ppc64le"): False,
}


@pytest.mark.parametrize(("sys_platform", "machine"), sorted(PLATFORMS))
def test_bitsandbytes_is_a_dependency_only_where_it_has_a_wheel(sys_platform, machine):
    """The installed metadata (what pip resolves) asks for bitsandbytes by default only where
    PyPI has a wheel for it, and the ``bitsandbytes`` extra asks for it everywhere."""
    from importlib.metadata import requires

    requirements = [Requirement(text) for text in requires("lora-merge") or []]
    environment = {"sys_platform": sys_platform, "platform_machine": machine}

    def wanted(extra: str) -> bool:
        return any(
            requirement.name == "bitsandbytes"
            and (requirement.marker or Marker("python_version > '0'")).evaluate(
                {**environment, "extra": extra}
            )
            for requirement in requirements
        )

    assert wanted("") is PLATFORMS[(sys_platform, machine)]
    assert wanted("bitsandbytes")
