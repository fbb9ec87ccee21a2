"""The I/O layer on every OS: the portable path (macOS, Windows) gives the fast path's bytes.

Linux has every fast system call, so the portable paths are exercised here by
hiding those functions from :mod:`os`: in-process for the file primitives, and
in a subprocess running the real CLI for whole merges, whose outputs must be
byte-identical to the fast path's and correct against float64 maths.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from handmade_checkpoints import write_adapter, write_base
from safetensors.torch import load_file

from lora_merge.finish.staging import StagingFolder, staging_name
from lora_merge.inputs.resolve import _is_same_or_inside, check_output_location
from lora_merge.io.positional import PositionalFile, read_bytes_at
from lora_merge.io.process import process_alive, signals_deferred

# What Windows lacks; macOS lacks the last two. Hiding all of them is the
# Windows path, hiding the last two the macOS path.
WINDOWS_MISSING = ("preadv", "pread", "pwrite", "posix_fadvise", "copy_file_range")
MACOS_MISSING = ("posix_fadvise", "copy_file_range")
PLATFORMS = {"linux": (), "macos": MACOS_MISSING, "windows": WINDOWS_MISSING}


def hide_os_functions(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> None:
    for name in names:
        monkeypatch.delattr(os, name, raising=False)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_positional_file_reads_writes_and_copies_the_same_bytes(tmp_path, monkeypatch, platform):
    """Many threads write disjoint ranges of one file at once, then read and copy them back."""
    hide_os_functions(monkeypatch, PLATFORMS[platform])
    piece = 300_000  # not a multiple of the write piece size: exercises the short last piece
    pieces = 16
    expected = bytes(torch.randint(0, 256, (piece * pieces,), dtype=torch.uint8).numpy())
    path = tmp_path / "file.bin"

    with PositionalFile(path, writable=True) as file:

        def write(index: int) -> None:
            view = memoryview(expected)[index * piece : (index + 1) * piece]
            file.write_all(view, index * piece)
            file.done_with(index * piece, piece)

        threads = [threading.Thread(target=write, args=(index,)) for index in range(pieces)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert path.read_bytes() == expected

    copy = tmp_path / "copy.bin"
    with PositionalFile(path) as source, PositionalFile(copy, writable=True) as destination:
        read_back = bytearray(len(expected))
        results: list[bool] = []

        def read(index: int) -> None:
            view = memoryview(read_back)[index * piece : (index + 1) * piece]
            source.will_need(index * piece, piece)
            results.append(source.read_exactly_into(view, index * piece))

        threads = [threading.Thread(target=read, args=(index,)) for index in range(pieces)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [True] * pieces
        assert bytes(read_back) == expected
        # Copy the second half to the front of another file, then the first half behind it.
        half = len(expected) // 2
        assert source.copy_to(destination, half, half, 0) == half
        assert source.copy_to(destination, half, 0, half) == half
        # Past the end, a copy stops short and says so.
        assert source.copy_to(destination, 10, len(expected) - 4, len(expected)) == 4
    assert copy.read_bytes() == expected[half:] + expected[:half] + expected[-4:]
    assert read_bytes_at(path, 5, 7) == expected[5:12]
    assert read_bytes_at(path, len(expected) - 3, 7) is None


# Runs the installed CLI's entry point with the given os functions removed first.
_BOOTSTRAP = """
import os, sys
for name in sys.argv[1].split(","):
    if name and hasattr(os, name):
        delattr(os, name)
from lora_merge.cli import main
sys.argv = ["lora-merge", *sys.argv[2:]]
main()
"""


def run_merge_without(names: tuple[str, ...], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BOOTSTRAP, ",".join(names), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_shard_inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("portable")
    write_base(folder / "base", shards=2)
    write_adapter(folder / "adapter")
    return folder / "base", folder / "adapter"


@pytest.mark.parametrize(
    "options",
    [
        pytest.param((), id="copy-untouched-tensors"),
        pytest.param(("--dtype", "fp32", "--max-shard-size", "40KB"), id="convert-all-reshard"),
    ],
)
def test_merge_without_fast_system_calls_is_byte_identical(two_shard_inputs, tmp_path, options):
    """The Windows and macOS paths write the Linux path's bytes, which are the float64 merge rounded."""
    base, adapter = two_shard_inputs
    outputs = {}
    for platform, hidden in PLATFORMS.items():
        out = tmp_path / platform
        result = run_merge_without(
            hidden, str(base), str(adapter), str(out), "--quiet", "--no-hash-inputs", *options
        )
        assert result.returncode == 0, result.stderr
        outputs[platform] = files_of(out)
    assert outputs["macos"] == outputs["linux"]
    assert outputs["windows"] == outputs["linux"]

    # Independent check of the shared result: every tensor is the float64 merge, rounded once.
    merged: dict[str, torch.Tensor] = {}
    for name in outputs["windows"]:
        if name.endswith(".safetensors"):
            merged.update(load_file(tmp_path / "windows" / name))
    base_tensors: dict[str, torch.Tensor] = {}
    for shard in base.glob("*.safetensors"):
        base_tensors.update(load_file(shard))
    factors = load_file(adapter / "adapter_model.safetensors")
    scale = 8 / 4  # lora_alpha / r of handmade_checkpoints.adapter_config
    assert set(merged) == set(base_tensors)
    for name, weight in base_tensors.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        exact = weight.double()
        if f"{prefix}.lora_A.weight" in factors:
            a = factors[f"{prefix}.lora_A.weight"].double()
            b = factors[f"{prefix}.lora_B.weight"].double()
            exact = exact + scale * (b @ a)
        result = merged[name]
        expected_dtype = torch.float32 if options else weight.dtype
        assert result.dtype == expected_dtype, name
        # One rounding of the float64 value: within half a unit in the last place of
        # the output dtype, plus float32 accumulation error (a few 2^-24 relative),
        # far below the bf16 half-ulp; 1 ulp bounds both on any CPU.
        ulp = torch.finfo(expected_dtype).eps * exact.abs().clamp_min(
            torch.finfo(torch.float32).tiny
        )
        assert ((result.double() - exact).abs() <= ulp).all(), name


@pytest.fixture
def ctrl_c_raises_keyboard_interrupt() -> Iterator[None]:
    """SIGINT handled as Python handles it at a terminal, whatever pytest inherited.

    A shell starts a background job (``pytest ... &``, nohup, some CI runners) with SIGINT
    ignored, and Python keeps it ignored: a test that expects Ctrl-C to raise would fail, and
    one that expects it to be held back would pass without checking anything.
    """
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_signals_deferred_holds_ctrl_c_back_and_restores_the_handler(
    ctrl_c_raises_keyboard_interrupt,
):
    """A Ctrl-C during the final renames neither interrupts them nor outlives them."""
    before = signal.getsignal(signal.SIGINT)
    ran_to_the_end = False
    with signals_deferred():
        signal.raise_signal(signal.SIGINT)
        ran_to_the_end = True
    assert ran_to_the_end
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_commit_replaces_out_while_a_signal_arrives(
    tmp_path, monkeypatch, ctrl_c_raises_keyboard_interrupt
):
    """The renames finish under a Ctrl-C that lands between them: OUT is the new folder."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = os.rename

    def rename_then_interrupt(source, target):
        real_rename(source, target)
        signal.raise_signal(signal.SIGINT)

    with StagingFolder(out) as staging:
        (staging.path / "new.txt").write_text("new")
        monkeypatch.setattr(os, "rename", rename_then_interrupt)
        staging.commit()
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_process_alive_tells_a_live_process_from_a_finished_one():
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid no longer names a process (until reused, which takes a while)
    assert not process_alive(child.pid)


def test_a_very_long_out_name_still_gets_a_staging_folder(two_shard_inputs, tmp_path):
    """The staging name adds ~40 characters to OUT's; a 250-character OUT must still work."""
    base, adapter = two_shard_inputs
    out = tmp_path / ("m" * 250)
    assert len(staging_name(out, 4_194_304, "abcdef12").encode()) <= 255
    result = run_merge_without((), str(base), str(adapter), str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_dead_runs_folder_is_found_whatever_the_case_of_out(tmp_path):
    """On macOS and Windows "Merged" and "merged" are one OUT: its leftovers are cleaned either way."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / staging_name(tmp_path / "Merged", dead.pid, "abcdef12")
    leftover.mkdir()
    with StagingFolder(tmp_path / "merged") as staging:
        assert not leftover.exists()
        assert staging.path.is_dir()


@pytest.mark.skipif(not Path("/proc/self/root").is_dir(), reason="needs Linux's /proc")
def test_out_inside_an_input_is_found_when_spelled_differently(tmp_path):
    """Another spelling of the same folder (here through /proc/self/root, on macOS and Windows
    letter case or a long-path prefix) is still that folder."""
    base = tmp_path / "base"
    base.mkdir()
    other_spelling = Path("/proc/self/root") / base.relative_to("/")
    assert other_spelling != base
    assert _is_same_or_inside(other_spelling / "merged", base)
    assert _is_same_or_inside(other_spelling, base)
    assert not _is_same_or_inside(tmp_path / "elsewhere", base)


def _case_insensitive(folder: Path) -> bool:
    probe = folder / "CaseProbe"
    probe.mkdir()
    try:
        return (folder / "caseprobe").exists()
    finally:
        probe.rmdir()


def test_out_differing_from_an_input_only_in_case(tmp_path):
    """On a case-insensitive filesystem (macOS, Windows), OUT "BASE" is the input "base":
    replacing it with --overwrite would delete the input, so it is refused."""
    if not _case_insensitive(tmp_path):
        pytest.skip(
            "this filesystem tells letter case apart (the macOS and Windows CI jobs run it)"
        )
    from lora_merge.errors import OutputError

    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(OutputError, match="lies inside the input folder"):
        check_output_location(tmp_path / "BASE", [base], overwrite=True)
