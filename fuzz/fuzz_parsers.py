"""Long-running fuzzing of lora-merge's parsers of untrusted files (a developer tool, not CI).

Targets, chosen by the first byte of each input:

0. a safetensors file (``read_safetensors_header``, then ``SafetensorsReader``: every
   tensor reads back as exactly its bytes, and a file truncated after parsing gives
   ``InvalidInputError``, never garbage);
1. ``adapter_config.json`` (``read_adapter_config``, then ``scale_for`` on a few modules);
2. ``model.safetensors.index.json`` in a folder with two valid shards (``resolve_base``);
3. adapter keys, one a line (``classify_adapter_keys``);
4. a safetensors header's JSON text alone: the length prefix and a 1 KiB data buffer are
   added, so mutations of the JSON do not all die on a wrong length.

The oracles and strategies are those of ``tests/test_fuzz_parsers.py`` (imported from
there): a parser returns a sound result or raises ``LoraMergeError``; anything else
(another exception, a hang, a read outside a tensor) is a bug.

Engines
-------
atheris (coverage-guided libFuzzer). Optional, not a dependency of lora-merge::

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=300
    .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=3600 -jobs=2 -workers=2 my_corpus/

Any libFuzzer flag works. A seed corpus (valid files of each target) is generated at
start into a temporary folder; name a corpus folder to keep what the fuzzer learns
between runs. Defaults added unless given: ``-timeout=20`` (a hang is a bug),
``-max_len=20000``, ``-dict=`` (JSON and safetensors tokens). A JSON-aware custom
mutator breaks one field of the JSON at a time (wrong types, huge numbers, ``NaN``,
deep nesting, lone surrogates) besides libFuzzer's byte mutations. A crash leaves
``crash-<sha1>``; replay it with ``.venv/bin/python fuzz/fuzz_parsers.py crash-<sha1>``.

hypothesis (the fallback when atheris is not installed, or with ``--hypothesis``)::

    .venv/bin/python fuzz/fuzz_parsers.py --hypothesis --max-examples 5000

runs each property of the test file for that many examples and prints the minimal
failing example of any bug.

Any exception other than ``LoraMergeError`` is a crash: libFuzzer stops and saves
the input (replay it with ``fuzz/fuzz_parsers.py crash-<sha1>``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any

# Heavy, uninstrumented imports first.
import hypothesis  # noqa: F401
import pytest  # noqa: F401
import safetensors  # noqa: F401
import torch  # noqa: F401

try:
    import atheris
except ImportError:  # optional: see the docstring
    atheris = None

TESTS = Path(__file__).resolve().parents[1] / "tests"
TARGETS = ("safetensors", "adapter_config", "index", "keys", "header_json")
DATA_BUFFER = bytes(range(256)) * 4
COUNTS = collections.Counter[str]()
STARTED = time.monotonic()
fuzz_tests: Any = None  # the module tests/test_fuzz_parsers.py, once imported


def _import_targets(instrument: bool) -> None:
    """Import lora_merge (instrumented for atheris) and the test module's oracles."""
    global fuzz_tests
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(TESTS / "support"))  # its helpers, as pytest's `pythonpath` has them
    if instrument:
        with atheris.instrument_imports(include=["lora_merge"]):
            import lora_merge.adapter.config
            import lora_merge.adapter.keys
            import lora_merge.inputs.resolve
            import lora_merge.io.reader
            import lora_merge.io.safetensors_format  # noqa: F401
    import test_fuzz_parsers as fuzz_tests


# --------------------------------------------------------------------------- one input


class Workspace:
    """Files rewritten for every input: one folder, reused."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lora-merge-fuzz-"))
        self.base = self.root / "base"
        self.base.mkdir()
        first = [["a", {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}]]
        second = [["b", {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}]]
        tests = fuzz_tests
        (self.base / tests.SHARD_NAMES[0]).write_bytes(tests.encode_safetensors(first, bytes(16)))
        (self.base / tests.SHARD_NAMES[1]).write_bytes(tests.encode_safetensors(second, bytes(6)))
        (self.base / "config.json").write_text('{"model_type": "llama"}')

    def run(self, data: bytes) -> None:
        if not data:
            return
        target = TARGETS[data[0] % len(TARGETS)]
        body = data[1:]
        COUNTS[target] += 1
        tests = fuzz_tests
        if target in ("safetensors", "header_json"):
            if target == "header_json":
                body = struct.pack("<Q", len(body)) + body + DATA_BUFFER
            path = self.root / "file.safetensors"
            path.write_bytes(body)
            header = tests.check_header(path)
            if header is not None:
                COUNTS[target + " (parsed)"] += 1
                tests.check_reader(header)
                cut = zlib.crc32(body) % (len(body) + 1)
                tests.check_reader_after_truncation(header, cut)
        elif target == "adapter_config":
            path = self.root / "adapter_config.json"
            path.write_bytes(body)
            if tests.check_adapter_config(path) is not None:
                COUNTS[target + " (parsed)"] += 1
        elif target == "index":
            (self.base / tests.INDEX_NAME).write_bytes(body)
            if tests.check_resolve(self.base) is not None:
                COUNTS[target + " (parsed)"] += 1
        else:
            keys = body.decode("utf-8", "replace").split("\n")
            if tests.check_keys(keys) is not None:
                COUNTS[target + " (parsed)"] += 1
        total = sum(COUNTS[name] for name in TARGETS)
        if (total & (total - 1) == 0 and total <= 2**16) or total % 100_000 == 0:
            _report(total)


def _report(total: int) -> None:
    counts = ", ".join(f"{name} {COUNTS[name]}" for name in sorted(COUNTS))
    elapsed = time.monotonic() - STARTED
    print(f"[lora-merge fuzz] {total} inputs in {elapsed:.0f} s: {counts}", file=sys.stderr)


# --------------------------------------------------------------------------- seeds


def seed_inputs() -> list[bytes]:
    """Valid (and a few famous broken) inputs of every target."""
    tests = fuzz_tests
    tensors = [
        ["model.embed_tokens.weight", {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]}],
        ["model.norm.weight", {"dtype": "F32", "shape": [8], "data_offsets": [64, 96]}],
        ["empty", {"dtype": "F16", "shape": [0, 3], "data_offsets": [96, 96]}],
        ["scalar", {"dtype": "I64", "shape": [], "data_offsets": [96, 104]}],
        ["flags", {"dtype": "BOOL", "shape": [2, 1], "data_offsets": [104, 106]}],
    ]
    metadata = ["__metadata__", {"format": "pt"}]
    headers = [[*tensors, metadata], tensors[:1], [], [metadata, tensors[1]]]
    seeds: list[bytes] = []
    for pairs in headers:
        blob = tests.encode_safetensors(pairs, DATA_BUFFER[:106])
        seeds.append(bytes([0]) + blob)
        seeds.append(bytes([4]) + blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    config = dict(tests.VALID_CONFIG)
    seeds.append(bytes([1]) + json.dumps(config).encode())
    config.update(use_rslora=True, rank_pattern={"^model.*q_proj": 16}, alpha_pattern={})
    seeds.append(bytes([1]) + json.dumps(config).encode())
    weight_map = {"a": tests.SHARD_NAMES[0], "b": tests.SHARD_NAMES[1]}
    seeds.append(
        bytes([2]) + json.dumps({"metadata": {"total_size": 22}, "weight_map": weight_map}).encode()
    )
    keys = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
        "base_model.model.lm_head.modules_to_save.weight",
        "base_model.model.lm_head.original_module.weight",
    ]
    seeds.append(bytes([3]) + "\n".join(keys).encode())
    return seeds


DICTIONARY_TOKENS = [
    *("dtype", "shape", "data_offsets", "__metadata__", "weight_map", "metadata", "format"),
    *("peft_type", "LORA", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"),
    *("fan_in_fan_out", "use_dora", "base_model_name_or_path", "true", "false", "null"),
    *("NaN", "Infinity", "-Infinity", "1e400", "18446744073709551615", "9223372036854775808"),
    *("\\ud800", "\\u0000", "(?i)", "a{4294967296}", ".lora_A.weight", ".lora_B.weight"),
    *(".lora_embedding_A", ".modules_to_save.", ".original_module.", "base_model.model."),
    *("../", "model-00001-of-00002.safetensors", "config.json"),
    *(f"{name}" for name in ("F64", "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3")),
]


def write_dictionary(path: Path) -> None:
    # libFuzzer reads C-like strings: json.dumps escapes the backslashes (all tokens are ASCII).
    path.write_text("".join(json.dumps(token) + "\n" for token in DICTIONARY_TOKENS))


# --------------------------------------------------------------------------- JSON-aware mutator

JSON_TARGETS = {1, 2, 4}
ODD_VALUES: list[object] = [
    *(-1, 0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, -(10**400)),
    *(0.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), True, False, None),
    *("", "F32", "LORA", "x" * 300, "..", "/etc/passwd", "(", "(?i)x", "a{4294967296}"),
    *([], {}, [0, 0], [1, 2, 3], {"q_proj": 4}, {"": 1.5}),
]


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Break one JSON field one time in three; libFuzzer's byte mutations otherwise."""
    rng = random.Random(seed)
    if len(data) > 1 and data[0] % len(TARGETS) in JSON_TARGETS and rng.random() < 0.35:
        try:
            value = json.loads(data[1:])
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict | list) and value:
            raw = fuzz_tests._Raw()
            value = _mutate_json(copy.deepcopy(value), rng, raw)
            text = raw.splice(json.dumps(value)).encode("utf-8", "surrogatepass")
            if len(text) + 1 <= max_size:
                return data[:1] + text
    return atheris.Mutate(data, max_size)


def _mutate_json(value: object, rng: random.Random, raw: Any) -> object:
    """Replace, drop or repeat one node somewhere in a JSON value."""
    node, depth = value, 0
    while isinstance(node, dict | list) and node and depth < 6:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        child = node[key]
        if not isinstance(child, dict | list) or not child or rng.random() < 0.4:
            action = rng.random()
            if action < 0.6:
                node[key] = copy.deepcopy(rng.choice(ODD_VALUES))
            elif action < 0.75:
                node[key] = raw(rng.choice(_raw_tokens()))
            elif action < 0.9:
                del node[key]
            elif isinstance(node, list):
                node.append(copy.deepcopy(child))
            else:  # a second key: the same (repeated below) or a look-alike
                twin = f"{key}\u0301" if rng.random() < 0.5 else f"{key}{key}"
                node[twin] = copy.deepcopy(child)
            return value
        node, depth = child, depth + 1
    return value


def _raw_tokens() -> list[str]:
    return ["NaN", "-Infinity", "1e400", "9" * 4301, '"\\ud800"', "[" * 3000 + "]" * 3000]


# --------------------------------------------------------------------------- engines


def run_atheris(argv: list[str]) -> None:
    workspace = Workspace()
    seeds = Path(tempfile.mkdtemp(prefix="lora-merge-fuzz-seeds-"))
    for number, seed in enumerate(seed_inputs()):
        (seeds / f"seed-{number:03d}").write_bytes(seed)
    dictionary = seeds.parent / (seeds.name + ".dict")
    write_dictionary(dictionary)
    flags = [arg for arg in argv[1:] if arg.startswith("-")]
    paths = [arg for arg in argv[1:] if not arg.startswith("-")]
    replaying = any(Path(path).is_file() for path in paths)
    defaults = {"-timeout": "20", "-max_len": "20000", "-dict": str(dictionary)}
    for flag, default in defaults.items():
        if not any(arg.startswith(flag + "=") for arg in flags):
            flags.append(f"{flag}={default}")
    if not replaying:
        paths = (paths or [tempfile.mkdtemp(prefix="lora-merge-fuzz-corpus-")]) + [str(seeds)]
    print(f"[lora-merge fuzz] atheris, corpus {paths}, flags {flags}", file=sys.stderr)
    try:
        atheris.Setup([argv[0], *flags, *paths], workspace.run, custom_mutator=custom_mutator)
        atheris.Fuzz()
    finally:
        shutil.rmtree(workspace.root, ignore_errors=True)


def run_hypothesis(max_examples: int) -> int:
    from hypothesis import given, settings

    tests = fuzz_tests
    workspace = Path(tempfile.mkdtemp(prefix="lora-merge-fuzz-"))
    chosen = settings(tests.FUZZ_SETTINGS, max_examples=max_examples, database=None)

    def file_check(blob: bytes) -> None:
        path = workspace / "file.safetensors"
        path.write_bytes(blob)
        header = tests.check_header(path)
        if header is not None:
            tests.check_reader(header)
            tests.check_reader_after_truncation(header, zlib.crc32(blob) % (len(blob) + 1))

    def config_check(blob: bytes) -> None:
        path = workspace / "adapter_config.json"
        path.write_bytes(blob)
        tests.check_adapter_config(path)

    def folder_check(files: dict[str, bytes | None]) -> None:
        with tests.scratch_folder(workspace) as folder:
            tests.write_folder(folder, files)
            tests.check_resolve(folder)

    properties = [
        ("random safetensors", tests.RANDOM_SAFETENSORS, file_check),
        ("mutated safetensors", tests.mutated_safetensors(), file_check),
        ("adapter configs", tests.config_texts(), config_check),
        ("base folders", tests.base_folders(), folder_check),
        ("adapter keys", tests.adapter_key_lists(), lambda keys: tests.check_keys(keys) and None),
    ]
    failed = 0
    for name, strategy, check in properties:
        started = time.monotonic()
        try:
            chosen(given(strategy)(check))()
        except Exception:
            failed += 1
            traceback.print_exc()
            print(f"[lora-merge fuzz] {name}: FAILED", file=sys.stderr)
        else:
            elapsed = time.monotonic() - started
            print(f"[lora-merge fuzz] {name}: {max_examples} examples passed in {elapsed:.0f} s")
    shutil.rmtree(workspace, ignore_errors=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--hypothesis", action="store_true", help="use hypothesis, not atheris")
    parser.add_argument("--max-examples", type=int, default=2000, help="per property (hypothesis)")
    parser.add_argument("--help", action="help")
    ours, rest = parser.parse_known_args()
    warnings.simplefilter("ignore")  # re's FutureWarnings about odd patterns are not findings
    use_atheris = atheris is not None and not ours.hypothesis
    _import_targets(instrument=use_atheris)
    if not use_atheris:
        if atheris is None and not ours.hypothesis:
            print(
                "[lora-merge fuzz] atheris is not installed: hypothesis fallback", file=sys.stderr
            )
        return run_hypothesis(ours.max_examples)
    run_atheris([sys.argv[0], *rest])
    return 0


if __name__ == "__main__":
    sys.exit(main())
