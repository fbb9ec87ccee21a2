"""BASE's untouched tensors copied while torch imports (``lora_merge.run.copy_ahead``).

The copies are planned from JSON and headers alone, by the run's own planner before
torch is imported; the run checks them against the plan it makes itself before it
skips a tensor. The oracles: the pinned digests of ``test_pinned_outputs`` (the
output stays byte for byte what it was), the base's own tensors read by the
safetensors library, and Python's ``-X importtime`` trace (planning and copying
import no torch).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from merge_process import LORA_MERGE
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_pinned_outputs import PINNED, build_case, output_digests
from test_startup import imported_modules, top_level

from lora_merge import MergeOptions
from lora_merge.api import merge
from lora_merge.errors import NonFiniteError
from lora_merge.io.positional import PositionalFile
from lora_merge.run.copy_ahead import copy_untouched_ahead


def untouched_names(base: Path, targets: tuple[str, ...]) -> set[str]:
    """BASE's non-empty tensors whose module no adapter target names, as safetensors reads them."""
    names = set()
    for shard in base.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
                if module not in targets and handle.get_slice(name).get_shape() != [0]:
                    names.add(name)
    return names


def staging_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "lora-merge-partial" in p.name)


@pytest.mark.parametrize(
    "case", ["llama-bf16-qv", "llama-bf16-embedding-and-lm-head", "llama-fp32-dora"]
)
def test_copied_ahead_output_is_the_pinned_one(case: str, tmp_path: Path) -> None:
    base, adapter, options = build_case(case, tmp_path)
    assert not options, "a case with options would not be copied ahead"
    out = tmp_path / "merged"
    merge_options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True)

    copies = copy_untouched_ahead(merge_options)
    assert copies is not None
    with copies:
        merge(merge_options, None, copies)

    assert output_digests(out) == PINNED[case]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    targets = tuple(adapter_config["target_modules"])
    # The run took from the copies exactly the tensors no target names.
    assert copies.taken == untouched_names(base, targets)
    assert staging_leftovers(tmp_path) == []


def test_copies_into_several_shards_hold_the_bases_bytes(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    pinned = tmp_path / "pinned"
    result = subprocess.run(
        [LORA_MERGE, str(base), str(adapter), str(pinned), "--quiet", "--no-hash-inputs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert output_digests(pinned) == PINNED["llama-bf16-qv"]
    out = tmp_path / "merged"
    options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True, max_shard_size="6KB")

    copies = copy_untouched_ahead(options)
    assert copies is not None
    with copies:
        merge(options, None, copies)

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    merged: dict = {}
    for shard in shards:
        merged.update(load_file(shard))
    expected = load_file(pinned / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype and merged[name].equal(tensor), name
    assert copies.taken == untouched_names(base, ("q_proj", "v_proj"))
    assert staging_leftovers(tmp_path) == []


def merge_foreseen_as(foreseen: MergeOptions, base: Path, adapter: Path, out: Path) -> set[str]:
    """Merge BASE + ADAPTER into OUT with copies started as ``foreseen`` guessed; the names taken."""
    copies = copy_untouched_ahead(foreseen)
    assert copies is not None
    with copies:
        merge(MergeOptions(base=base, adapter=adapter, out=out, quiet=True), None, copies)
    return copies.taken


def test_a_wrong_guess_is_written_whole_and_leaves_no_stray_shard(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    # Foreseen with small shards (model-0000N-of-0000M), merged into one model.safetensors.
    foreseen = MergeOptions(base=base, adapter=adapter, out=out, max_shard_size="6KB")

    assert merge_foreseen_as(foreseen, base, adapter, out) == set()
    assert output_digests(out) == PINNED["llama-bf16-qv"]  # no stray shard in OUT either
    assert staging_leftovers(tmp_path) == []


def test_another_header_is_written_whole(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    # The same shard name, another header: the base's label in the metadata differs.
    foreseen = MergeOptions(base=f"{base}/.", adapter=adapter, out=out)

    assert merge_foreseen_as(foreseen, base, adapter, out) == set()
    assert output_digests(out) == PINNED["llama-bf16-qv"]
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert handle.metadata()["lora_merge.base"] == str(base)


def test_a_failing_run_removes_the_copies(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    factors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in factors if "lora_B" in k)[-1]
    factors[key][0, 0] = float("nan")  # the stream refuses it, after the copies were taken over
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True)

    copies = copy_untouched_ahead(options)
    assert copies is not None
    with pytest.raises(NonFiniteError), copies:
        merge(options, None, copies)

    assert not out.exists()
    assert staging_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "options",
    [
        {"dtype": "fp16"},
        {"save_method": "merged_4bit"},
        {"unmerge": True},
        {"resume": True},
        {"part": "0/2"},
        {"weights": "0.5"},
    ],
)
def test_nothing_is_copied_ahead_where_headers_cannot_foresee_the_output(
    options: dict, tmp_path: Path
) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    merge_options = MergeOptions(base=base, adapter=adapter, out=tmp_path / "merged", **options)

    assert copy_untouched_ahead(merge_options) is None


def test_foreseeing_and_copying_import_no_torch(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    code = (
        "import sys\n"
        "from lora_merge.options.settings import MergeOptions\n"
        "from lora_merge.run.copy_ahead import copy_untouched_ahead\n"
        f"options = MergeOptions(base={str(base)!r}, adapter={str(adapter)!r}, out={str(out)!r})\n"
        "copies = copy_untouched_ahead(options)\n"
        "assert copies is not None, 'nothing foreseen'\n"
        "with copies:\n"
        "    for shard in copies.shards:\n"
        "        shard.done.wait()\n"
        "    print(sum(len(shard.copied) for shard in copies.shards))\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(untouched_names(base, ("q_proj", "v_proj")))
    packages = top_level(imported_modules(result.stderr))
    assert "lora_merge" in packages
    assert packages.isdisjoint({"torch", "numpy", "safetensors"}), sorted(packages)
    assert staging_leftovers(tmp_path) == []


def test_the_command_copies_ahead_before_it_imports_torch(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lora_merge", str(base), str(adapter), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    # -X importtime writes a line as each import completes, in the order they complete.
    order = [
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    ]
    assert order.index("lora_merge.run.copy_ahead") < order.index("torch")
    assert output_digests(out) == PINNED["llama-bf16-qv"]


def test_a_resumable_run_stages_elsewhere_and_drops_the_copies(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    foreseen = MergeOptions(base=base, adapter=adapter, out=out)
    options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True, resume=True)

    copies = copy_untouched_ahead(foreseen)
    assert copies is not None
    with copies:
        merge(options, None, copies)

    assert copies.taken == set()
    assert output_digests(out) == PINNED["llama-bf16-qv"]
    assert staging_leftovers(tmp_path) == []


def test_an_adapter_written_as_it_is_gets_no_copied_shard(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    foreseen = MergeOptions(base=base, adapter=adapter, out=out)
    options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True, save_method="lora")

    copies = copy_untouched_ahead(foreseen)
    assert copies is not None
    with copies:
        merge(options, None, copies)

    assert not list(out.glob("model*.safetensors"))
    assert (out / "adapter_model.safetensors").is_file()
    assert staging_leftovers(tmp_path) == []


def test_a_failed_copy_ahead_is_written_by_the_run(tmp_path: Path, monkeypatch) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True)
    copy_to = PositionalFile.copy_to

    def full_disk_while_copying_ahead(self, *args, **kwargs):
        # Only the copying thread meets the full disk (the run's own copies succeed),
        # after its first tensor.
        if threading.current_thread().name == "lora-merge-copy-ahead" and copies.shards[0].copied:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy_to(self, *args, **kwargs)

    monkeypatch.setattr(PositionalFile, "copy_to", full_disk_while_copying_ahead)
    copies = copy_untouched_ahead(options)
    assert copies is not None
    with copies:
        merge(options, None, copies)

    assert len(copies.shards[0].copied) == 1
    assert copies.taken == set()
    assert output_digests(out) == PINNED["llama-bf16-qv"]
    assert staging_leftovers(tmp_path) == []


def test_copies_never_started_are_never_taken(tmp_path: Path) -> None:
    base, adapter, _ = build_case("llama-bf16-qv", tmp_path)
    out = tmp_path / "merged"
    options = MergeOptions(base=base, adapter=adapter, out=out, quiet=True)

    copies = copy_untouched_ahead(options)
    assert copies is not None
    merge(options, None, copies)  # outside its with-block: nothing was copied

    assert copies.taken == set()
    assert output_digests(out) == PINNED["llama-bf16-qv"]
    assert staging_leftovers(tmp_path) == []
