"""The pure pieces against independent oracles: safetensors I/O, shard planning, PEFT's pattern
rule, JSON files."""

from __future__ import annotations

import itertools
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_merge.adapter.config import pattern_key_for
from lora_merge.dtypes import F32, dtype_of
from lora_merge.errors import InvalidInputError, UsageError
from lora_merge.io.json_files import parse_json_object, read_json_object
from lora_merge.io.reader import SafetensorsReader
from lora_merge.io.safetensors_format import read_safetensors_header
from lora_merge.io.shard_writer import ShardWriter, TensorSpec
from lora_merge.options import parse_size
from lora_merge.plan.shards import plan_output_shards, shard_file_names, shard_layout

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.uint8, torch.bool]


def _random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 100, shape, generator=generator, dtype=dtype)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    tensors=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6),
    chunk_rows=st.integers(1, 3),
)
def test_shard_writer_output_reads_back_with_the_safetensors_library(
    tmp_path_factory, tensors, chunk_rows
):
    """Header first, then each tensor's slot filled in row chunks, last tensor first: safetensors loads them back."""
    path = tmp_path_factory.mktemp("writer") / "out.safetensors"
    expected = {
        f"t{i}": _random_tensor(shape, dtype, i) for i, (shape, dtype) in enumerate(tensors)
    }
    specs = [TensorSpec(name, dtype_of(t.dtype), tuple(t.shape)) for name, t in expected.items()]
    with ShardWriter(path, specs) as writer:
        for name, tensor in reversed(expected.items()):
            if tensor.numel() == 0:
                continue  # zero-byte tensors need no data
            slot = writer.tensor(name)
            if tensor.dim() == 0:
                slot.write(tensor)
                continue
            for start in range(0, tensor.shape[0], chunk_rows):
                slot.write(tensor[start : start + chunk_rows])
    loaded = load_file(path)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # the default when none is given
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_length % 8 == 0  # data buffer 8-byte aligned, as safetensors writes it


@settings(max_examples=30, deadline=None)
@given(tensors=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6))
def test_reader_returns_what_safetensors_saved_row_range_by_row_range(tmp_path_factory, tensors):
    """Our pread-based reader and byte copier agree with safetensors' own save_file."""
    path = tmp_path_factory.mktemp("reader") / "in.safetensors"
    expected = {
        f"t{i}": _random_tensor(shape, dtype, i) for i, (shape, dtype) in enumerate(tensors)
    }
    save_file(expected, path)
    header = read_safetensors_header(path)
    with SafetensorsReader({e.name: e for e in header.entries}) as reader:
        for name, tensor in expected.items():
            assert torch.equal(reader.read_rows(name), tensor)
            if tensor.dim() and tensor.shape[0] >= 2:
                assert torch.equal(reader.read_rows(name, 1, 2), tensor[1:2])
        copy_path = path.with_suffix(".copy")
        specs = [TensorSpec(n, dtype_of(t.dtype), tuple(t.shape)) for n, t in expected.items()]
        with ShardWriter(copy_path, specs) as writer:
            for name, tensor in expected.items():
                if tensor.numel():
                    writer.tensor(name).copy_from(reader, name)
    copied = load_file(copy_path)
    assert all(torch.equal(copied[n], t) for n, t in expected.items())


def _write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    prefix = struct.pack("<Q", len(encoded) if length is None else length)
    path.write_bytes(prefix + encoded + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "length", "reason"),
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            None,
            "past the end",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            b"\0" * 8,
            None,
            "shape needs",
        ),
        (
            {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}},
            b"\0" * 2,
            None,
            "unknown dtype",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        (b"{not json", b"", None, "not valid JSON"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            10**12,
            "implausibly large",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "invalid shape",
        ),
        ([1, 2], b"", None, "not a JSON object"),
    ],
    ids=[
        "truncated",
        "size-vs-shape",
        "unknown-dtype",
        "overlap",
        "bad-json",
        "huge-length",
        "negative-shape",
        "not-object",
    ],
)
def test_corrupt_headers_are_refused_with_the_reason(tmp_path, header, data, length, reason):
    """Headers are never trusted: each defect is a clear InvalidInputError."""
    path = _write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InvalidInputError, match=reason):
        read_safetensors_header(path)


@given(
    sizes=st.lists(st.integers(0, 1000), max_size=40),
    limit=st.integers(1, 3000),
)
def test_shard_plan_keeps_order_and_respects_the_limit(sizes, limit):
    """Every tensor once, in order; a shard exceeds the limit only when it holds one tensor."""
    named = [(f"t{i}", size) for i, size in enumerate(sizes)]
    shards = plan_output_shards(named, limit)
    assert [name for shard in shards for name in shard] == [name for name, _ in named]
    size_of = dict(named)
    for shard in shards:
        total = sum(size_of[name] for name in shard)
        assert total <= limit or len(shard) == 1
    # greedy: the first tensor of each later shard did not fit in the previous one
    for previous, current in itertools.pairwise(shards):
        assert sum(size_of[n] for n in previous) + size_of[current[0]] > limit


@dataclass(frozen=True)
class _Spec:
    name: str
    nbytes: int


@dataclass(frozen=True)
class _Planned:
    spec: _Spec
    written_with: str | None = None


@given(
    groups=st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=4), max_size=25),
    limit=st.integers(1, 3000),
)
def test_shard_layout_keeps_a_weight_and_the_tensors_written_with_it_together(groups, limit):
    """A 4-bit weight's scales and quant state (``written_with`` the weight) share its shard;
    groups keep their order; a shard passes the limit only when it holds one group."""
    tensors = []
    for number, sizes in enumerate(groups):
        leader = f"w{number}"
        tensors.append(_Planned(_Spec(leader, sizes[0])))
        tensors += [
            _Planned(_Spec(f"{leader}.part{k}", size), written_with=leader)
            for k, size in enumerate(sizes[1:])
        ]
    layout = shard_layout(tensors, limit)
    assert [name for name, _ in layout] == shard_file_names(len(layout))
    assert [t for _, members in layout for t in members] == tensors
    group_of = {t.spec.name: t.written_with or t.spec.name for t in tensors}
    for _, members in layout:
        leaders = list(dict.fromkeys(group_of[t.spec.name] for t in members))
        assert sum(t.spec.nbytes for t in members) <= limit or len(leaders) == 1
    shard_of = {t.spec.name: file for file, members in layout for t in members}
    assert all(shard_of[name] == shard_of[leader] for name, leader in group_of.items())


def test_shard_file_names_follow_the_hugging_face_convention():
    """One shard is model.safetensors; more are model-0000i-of-0000N.safetensors."""
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3)[2] == "model-00003-of-00003.safetensors"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1048576", 2**20),
        ("1.5 kb", 1500),
        (7, 7),
    ],
)
def test_sizes_parse_like_huggingface_hub(text, expected):
    """Decimal units are powers of 1000, binary ones of 1024, bare numbers bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1", "0", "GB"])
def test_bad_sizes_are_refused(text):
    """Nonsense sizes are usage errors (exit 2), from the CLI and from Python alike."""
    with pytest.raises(UsageError):
        parse_size(text)


module_names = st.lists(
    st.sampled_from(
        [
            "model",
            "layers",
            "0",
            "1",
            "12",
            "self_attn",
            "q_proj",
            "v_proj",
            "mlp",
            "up_proj",
            "proj",
        ]
    ),
    min_size=1,
    max_size=6,
).map(".".join)
pattern_keys = st.lists(
    st.sampled_from(
        [
            "q_proj",
            "v_proj",
            "proj",
            "layers.0.self_attn.q_proj",
            r"layers\.1\..*",
            "mlp.up_proj",
            ".*_proj",
            "0.q_proj",
        ]
    ),
    max_size=4,
    unique=True,
)


@given(patterns=pattern_keys, name=module_names)
def test_pattern_resolution_is_pefts_get_pattern_key(patterns, name):
    """rank_pattern / alpha_pattern keys resolve exactly as PEFT resolves them."""
    ours = pattern_key_for(patterns, name)
    peft = get_pattern_key(patterns, name)
    # PEFT returns the module name itself when nothing matches.
    assert (ours if ours is not None else name) == peft


def test_shard_writer_refuses_missing_and_extra_bytes(tmp_path):
    """A tensor left unwritten, or written past its planned size, is a bug caught at the writer."""
    specs = [TensorSpec("a", F32, (2,)), TensorSpec("b", F32, (1,))]
    with (
        pytest.raises(RuntimeError, match="before tensor 'b'"),
        ShardWriter(tmp_path / "x", specs) as writer,
    ):
        writer.tensor("a").write(torch.zeros(2))
    with ShardWriter(tmp_path / "y", specs) as writer:
        slot = writer.tensor("b")
        with pytest.raises(RuntimeError, match="more bytes"):
            slot.write(torch.zeros(2))
        slot.write(torch.zeros(1))
        writer.tensor("a").write(torch.zeros(2))


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=12,
)


@given(value=json_values)
def test_json_objects_read_as_the_json_module_parses_them(tmp_path_factory, value):
    """read_json_object gives what json.loads gives for an object, and refuses any other value."""
    path = tmp_path_factory.mktemp("json") / "config.json"
    text = json.dumps(value, ensure_ascii=False)
    path.write_bytes(text.encode("utf-8"))
    if isinstance(value, dict):
        assert read_json_object(path) == json.loads(text)
    else:
        with pytest.raises(InvalidInputError, match=f"{re.escape(str(path))} is not a JSON object"):
            read_json_object(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        (b"\xff\xfe{}", "cannot read"),
        (b"{r: 8", "is not valid JSON"),
        (b"[" * 100_000, "is not valid JSON \\(nested too deeply\\)"),
        (b'{"r": ' + b"1" * 5000 + b"}", "is not valid JSON"),
        (b"[1, 2]", "is not a JSON object"),
    ],
    ids=["missing", "not-utf-8", "syntax", "deep", "long-int", "list"],
)
def test_unreadable_json_is_refused_with_the_file_and_the_reason(tmp_path, content, reason):
    """Each way a JSON file can be unusable is one InvalidInputError naming the file."""
    path = tmp_path / "adapter_config.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=reason) as caught:
        read_json_object(path)
    assert str(path) in str(caught.value)


def test_json_bytes_must_be_utf_8():
    """JSON between systems is UTF-8 (RFC 8259): UTF-16 bytes are refused, not guessed."""
    with pytest.raises(InvalidInputError, match="quant state 'x' is not UTF-8"):
        parse_json_object('{"a": 1}'.encode("utf-16"), "quant state 'x'")
    assert parse_json_object('{"a": "é"}'.encode(), "quant state 'x'") == {"a": "é"}
