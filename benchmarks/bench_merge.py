"""Benchmark ``lora-merge`` against ``cp -r`` and a plain PEFT merge.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_merge.py                 # 1b shape
    .venv/bin/python benchmarks/bench_merge.py --shape 7b --repeat 3 \\
        --json .bench/bench_merge/7b.json

What it does:

1. Builds, or reuses from the work folder (``--workdir``, default
   ``<repo>/.bench/bench_merge``; ``.bench/`` is git-ignored), a
   random bf16 Llama checkpoint of the chosen shape (``1b`` = TinyLlama-1.1B,
   ``3b`` = OpenLLaMA-3B, ``7b`` = Llama-2-7B, ``tiny`` for smoke tests) in
   3 safetensors shards, and a PEFT LoRA adapter (r=16, alpha=32, all 7
   linear projections of every layer, fp32). See ``synthetic_checkpoints.py``.
   The build runs in a subprocess and streams tensors to disk, so neither it
   nor this process holds a model in memory.
2. Runs each case in its own subprocess, one after another; with
   ``--repeat N`` the cases are interleaved (cp, lora-merge, PEFT, cp, ...):

   * ``cp -r BASE OUT``: the I/O floor, copying the same bytes.
   * ``python -m lora_merge BASE ADAPTER OUT --quiet --overwrite``, with
     ``<repo>/src`` put first on ``PYTHONPATH`` when it exists, so the working
     tree is measured even if the package is not installed.
   * with ``--before SRC``: the same command run from an earlier checkout's
     ``src/`` (same interpreter and libraries), so before and after are
     measured side by side in one run.
   * ``peft_merge_reference.py``: ``AutoModelForCausalLM.from_pretrained(BASE,
     dtype=torch.bfloat16)``, ``PeftModel.from_pretrained``,
     ``merge_and_unload()``, ``save_pretrained(OUT)`` (``--skip-peft`` to skip).

   Before every run, untimed: the output folder is removed if left over, the
   base model and adapter files are read once in full (we cannot drop the
   page cache, so instead every case starts with the inputs cached), and
   ``sync`` is called. After every run, ``sync`` is timed separately (the
   "flush" figure in the JSON, not in the wall time) and the output folder is
   removed. lora-merge fsyncs its output before renaming it into place, so its
   wall time already includes most of the flush; cp and PEFT do not, so their
   wall times are "written to the page cache" times. The fair comparison of
   durable outputs is the "on disk" column (wall + the sync after it).

   Every lora-merge run starts with an empty digest cache of its own
   (``LORA_MERGE_CACHE`` pointed at a fresh folder under the work folder's
   ``outputs/``): lora-merge keeps the sha256 of the inputs it hashed per user
   (docs/provenance.md), so without this the second and later repeats would
   skip hashing the base and the medians would no longer be first-run figures
   comparable with earlier tables. ``--warm-digest-cache`` measures re-runs
   instead: each lora-merge case's cache is filled by one untimed run, then
   kept across its repeats.

   A failing case does not stop the benchmark: its row says
   ``FAILED (exit N): <last stderr line>`` and its logs stay in
   ``<workdir>/logs/``. Children get ``HF_HUB_OFFLINE=1``.

3. Prints, on stdout, a header line and a Markdown table. Progress goes to
   stderr. ``--json PATH`` also dumps every raw figure.

What the figures mean:

* **wall s**: wall-clock time from spawning the child to its exit, median over
  the repeats. It includes interpreter start-up and imports (torch,
  transformers...) because a user pays for them too.
* **peak RSS MB**: the kernel's ``ru_maxrss`` of the child, in MiB, maximum
  over the repeats. It is read with ``os.wait4`` on the child, which returns
  the rusage of that one child (and of the descendants it waited for), so each
  run gets its own figure without a wrapper process. It is the peak of the
  largest single process, not a sum over processes, and it counts file-backed
  pages the process has mapped (e.g. safetensors files it ``mmap``-ed and
  touched), not only memory it allocated. Floor of the method: a child
  inherits, through ``vfork``/``exec``, the peak RSS of the process that spawns
  it, so this script never imports torch and prints that floor (what ``true``
  measures) in the header; figures near it mean "tiny".
* **wall ratio vs cp -r**: case wall / ``cp -r`` wall. GNU cp 9 copies with
  ``copy_file_range``, in the kernel, page cache to page cache, so while the
  inputs are cached and the output stays under the kernel's dirty-page
  thresholds (``vm.dirty_background_ratio``) this floor measures memory
  bandwidth rather than the disk; at larger shapes it becomes disk-bound.
  Figures are noisy on small VMs: right after a build, the first ``cp -r``
  of a run was once 9x slower than the next ones (4.8 s vs 0.55 s at 1b),
  so use ``--repeat 3`` or more for figures you report.
* **on disk s** / **on-disk ratio vs cp -r**: wall + the ``sync`` after the
  run, i.e. until the output is on disk, and its ratio to ``cp -r``'s. This is
  the disk-bound floor: ``cp -r`` followed by ``sync``.
* **RSS ratio vs lora-merge**: PEFT peak RSS / lora-merge peak RSS.
* **sampled peak anon MB**: with psutil installed, the whole child process
  tree is polled every ``--sample-interval`` seconds (default 0.1) and the sum
  over its processes of RSS minus shared (file-backed) pages is recorded; the
  column is the maximum. It is the memory the merge really allocated,
  without page-cache pages it mapped, summed over worker processes if any.
  Being sampled, it can miss spikes shorter than the interval.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

try:
    import psutil
except ImportError:  # psutil is optional: the sampled column shows "n/a".
    psutil = None

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))

import synthetic_checkpoints  # noqa: E402  (needs BENCHMARKS_DIR on sys.path)

REPO_ROOT = BENCHMARKS_DIR.parent
DEFAULT_WORKDIR = REPO_ROOT / ".bench" / "bench_merge"
PEFT_REFERENCE_SCRIPT = BENCHMARKS_DIR / "peft_merge_reference.py"
MIB = 1024 * 1024
WARM_UP_READ_CHUNK_BYTES = 1 * MIB
DISK_SPACE_MARGIN = 1.05
NOT_APPLICABLE = "—"

TABLE_COLUMNS = (
    "case",
    "wall s",
    "on disk s",
    "peak RSS MB",
    "wall ratio vs cp -r",
    "on-disk ratio vs cp -r",
    "RSS ratio vs lora-merge",
    "sampled peak anon MB",
)

CP_CASE = "cp -r"
LORA_MERGE_CASE = "lora-merge"
BEFORE_CASE = f"{LORA_MERGE_CASE} before"
PEFT_CASE = "PEFT merge_and_unload"


@dataclass
class RunFigures:
    """Figures of one run of one case.

    Attributes:
        wall_s: Seconds from spawning the child to its exit.
        max_rss_bytes: Kernel ``ru_maxrss`` of the child, in bytes.
        sampled_peak_tree_rss_bytes: Largest sampled RSS summed over the
            process tree (``None`` without psutil, with sampling off, or if
            the child exited before the first sample).
        sampled_peak_tree_anon_bytes: Same for RSS minus shared pages.
        flush_s: Seconds ``sync`` took right after the run (not in ``wall_s``).
        output_bytes: Size of the output folder's files, 0 if none.
        exit_code: Exit status; negative for a signal, as in ``subprocess``.
        timed_out: Whether the run was killed by ``--timeout``.
        last_stderr_line: Last non-empty line the child wrote to stderr.
        user_s: CPU seconds the child (and the descendants it waited for) ran in user
            mode, from the same ``wait4`` rusage.
        system_s: CPU seconds in the kernel, likewise (not the kernel's own write-back
            threads).
    """

    wall_s: float
    max_rss_bytes: int
    sampled_peak_tree_rss_bytes: int | None
    sampled_peak_tree_anon_bytes: int | None
    flush_s: float = 0.0
    output_bytes: int = 0
    exit_code: int = 0
    timed_out: bool = False
    last_stderr_line: str = ""
    user_s: float = 0.0
    system_s: float = 0.0

    @property
    def succeeded(self) -> bool:
        """Whether the child exited with status 0 in time."""
        return self.exit_code == 0 and not self.timed_out


@dataclass
class BenchmarkCase:
    """A command to measure, and the figures of its runs.

    Attributes:
        name: Row label.
        argv: Command line.
        output: Folder the command writes (removed before and after runs).
        env: Environment of the child.
        runs: Figures of each run, in order.
        digest_cache: lora-merge's digest cache folder (``LORA_MERGE_CACHE`` in
            ``env``), emptied before each run unless ``--warm-digest-cache``; None for
            other commands.
    """

    name: str
    argv: list[str]
    output: Path
    env: dict[str, str]
    runs: list[RunFigures] = field(default_factory=list)
    digest_cache: Path | None = None

    @property
    def first_failure(self) -> RunFigures | None:
        """The first failed run, or ``None`` if all succeeded."""
        return next((run for run in self.runs if not run.succeeded), None)

    @property
    def median_on_disk_s(self) -> float:
        """Median over runs of wall + the ``sync`` after it: until the output is on disk."""
        return statistics.median(run.wall_s + run.flush_s for run in self.runs)

    @property
    def median_wall_s(self) -> float:
        """Median wall time over the runs."""
        return statistics.median(run.wall_s for run in self.runs)

    @property
    def median_user_s(self) -> float:
        """Median user-mode CPU seconds over the runs."""
        return statistics.median(run.user_s for run in self.runs)

    @property
    def median_system_s(self) -> float:
        """Median kernel-mode CPU seconds over the runs."""
        return statistics.median(run.system_s for run in self.runs)

    @property
    def peak_rss_bytes(self) -> int:
        """Largest ``ru_maxrss`` over the runs."""
        return max(run.max_rss_bytes for run in self.runs)

    @property
    def sampled_peak_anon_bytes(self) -> int | None:
        """Largest sampled anonymous RSS over the runs, if sampled."""
        samples = [run.sampled_peak_tree_anon_bytes for run in self.runs]
        known = [sample for sample in samples if sample is not None]
        return max(known) if known and len(known) == len(samples) else None


class ProcessTreeMemorySampler:
    """Polls the memory of a process and its descendants in a thread.

    Uses psutil; does nothing when psutil is missing or the interval is 0.
    """

    def __init__(self, pid: int, interval_s: float) -> None:
        """Prepares a sampler.

        Args:
            pid: Root process of the tree.
            interval_s: Seconds between samples; 0 disables sampling.
        """
        self.enabled = psutil is not None and interval_s > 0
        self.sample_count = 0
        self.peak_rss_bytes = 0
        self.peak_anon_bytes = 0
        self._pid = pid
        self._interval_s = interval_s
        self._stop_requested = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        """Starts polling."""
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        """Stops polling and waits for the polling thread."""
        self._stop_requested.set()
        if self.enabled:
            self._thread.join()

    def _poll(self) -> None:
        try:
            root = psutil.Process(self._pid)
        except psutil.Error:
            return
        while True:
            self._sample(root)
            if self._stop_requested.wait(self._interval_s):
                return

    def _sample(self, root: psutil.Process) -> None:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total_rss = total_anon = 0
        for process in processes:
            try:
                memory = process.memory_info()
            except psutil.Error:
                continue
            total_rss += memory.rss
            total_anon += memory.rss - memory.shared
        if total_rss == 0:  # Exited (zombie) before this sample.
            return
        self.sample_count += 1
        self.peak_rss_bytes = max(self.peak_rss_bytes, total_rss)
        self.peak_anon_bytes = max(self.peak_anon_bytes, total_anon)


def last_non_empty_line(path: Path, max_chars: int = 200) -> str:
    """Returns the last non-empty line of a text file, shortened.

    Args:
        path: File to read (its last 64 KiB are enough).
        max_chars: Longest line returned; longer lines are cut with "...".

    Returns:
        The line, or ``""`` if the file is missing or blank.
    """
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - 65536))
            tail = file.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."


def run_measured(
    argv: Sequence[str],
    env: dict[str, str],
    log_stem: Path,
    timeout_s: float | None,
    sample_interval_s: float,
) -> RunFigures:
    """Runs a command and measures its wall time and memory.

    The child runs in its own session so a timeout can kill its whole process
    group. Its exit is first awaited without reaping it (``waitid`` with
    ``WNOWAIT``), so the sampler stops while the pid is still ours, then it is
    reaped with ``wait4``, which gives its own rusage.

    Args:
        argv: Command line.
        env: Environment of the child.
        log_stem: Path prefix of the ``.stdout`` and ``.stderr`` logs.
        timeout_s: Seconds before the process group gets SIGKILL; ``None``
            for no limit.
        sample_interval_s: Seconds between memory samples; 0 disables.

    Returns:
        The run's figures (flush and output size are filled in by the caller).
    """
    stderr_path = log_stem.with_name(log_stem.name + ".stderr")
    stdout_path = log_stem.with_name(log_stem.name + ".stdout")
    with stdout_path.open("wb") as stdout_file, stderr_path.open("wb") as stderr_file:
        started = time.perf_counter()
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout_file,
            stderr=stderr_file,
            env=env,
            start_new_session=True,
        )
    sampler = ProcessTreeMemorySampler(process.pid, sample_interval_s)
    sampler.start()
    timed_out = threading.Event()

    def kill_process_group() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    killer = threading.Timer(timeout_s, kill_process_group) if timeout_s else None
    if killer:
        killer.start()
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    wall_s = time.perf_counter() - started
    if killer:
        killer.cancel()
    sampler.stop()
    sampled = sampler.sample_count > 0
    _, wait_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return RunFigures(
        wall_s=wall_s,
        max_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB.
        sampled_peak_tree_rss_bytes=sampler.peak_rss_bytes if sampled else None,
        sampled_peak_tree_anon_bytes=sampler.peak_anon_bytes if sampled else None,
        exit_code=process.returncode,
        timed_out=timed_out.is_set(),
        last_stderr_line=last_non_empty_line(stderr_path),
        user_s=usage.ru_utime,
        system_s=usage.ru_stime,
    )


def measure_rss_floor(log_dir: Path) -> int:
    """Measures what ``ru_maxrss`` reports for a child that does nothing.

    Args:
        log_dir: Folder for the logs of the ``true`` run.

    Returns:
        ``ru_maxrss`` of ``true`` in bytes: the floor of the RSS column.
    """
    true_command = shutil.which("true") or "/bin/true"
    return run_measured(
        [true_command], dict(os.environ), log_dir / "rss-floor", None, 0
    ).max_rss_bytes


def files_under(folders: Iterable[Path]) -> list[Path]:
    """Lists the regular files under folders, recursively, sorted.

    Args:
        folders: Folders to walk.

    Returns:
        File paths.
    """
    return sorted(path for folder in folders for path in folder.rglob("*") if path.is_file())


def read_files_once(paths: Iterable[Path]) -> None:
    """Reads files to the end with a small buffer, to pull them into the page cache.

    Args:
        paths: Files to read.
    """
    buffer = bytearray(WARM_UP_READ_CHUNK_BYTES)
    for path in paths:
        with path.open("rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def drop_page_cache() -> None:
    """Empties the kernel's page cache (needs root), so that inputs come from the disk.

    Raises:
        SystemExit: If this process may not drop the cache.
    """
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as err:
        raise SystemExit(f"--cold needs root to drop the page cache: {err}") from err


def tree_size_bytes(folder: Path) -> int:
    """Returns the total size of the files under a folder, 0 if it is missing.

    Args:
        folder: Folder to measure.

    Returns:
        Size in bytes.
    """
    return sum(path.stat().st_size for path in files_under([folder])) if folder.is_dir() else 0


def remove_output(output: Path) -> None:
    """Removes an output folder (or file) if it exists.

    Args:
        output: Path to remove.
    """
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    elif output.exists() or output.is_symlink():
        output.unlink()


def child_environment(extra_python_path: Path | None = None) -> dict[str, str]:
    """Returns the environment for benchmark children.

    Args:
        extra_python_path: Folder to put first on ``PYTHONPATH``, if any.

    Returns:
        A copy of this process's environment with the Hugging Face Hub set
        offline and, if given, ``extra_python_path`` prepended to
        ``PYTHONPATH``.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if extra_python_path is not None:
        parts = [str(extra_python_path), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def build_quantized_base(base: Path, quant_type: str) -> Path:
    """Builds (or reuses) a bitsandbytes 4-bit copy of ``base`` with double quantization.

    Uses ``tests/support/bnb_checkpoints.py``, which writes the layout transformers saves
    (a test checks it byte for byte against transformers' own output).

    Args:
        base: The 16-bit base model folder.
        quant_type: ``nf4`` or ``fp4``.

    Returns:
        The quantized model folder, ``<base>-<quant_type>``.

    Raises:
        SystemExit: If the build fails.
    """
    quantized = base.with_name(f"{base.name}-{quant_type}")
    if (quantized / "config.json").is_file():
        return quantized
    partial = quantized.with_name(quantized.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable,
        str(REPO_ROOT / "tests" / "support" / "bnb_checkpoints.py"),
        str(base),
        str(partial),
        "--quant-type",
        quant_type,
        "--double-quant",
    ]
    print(f"  quantizing {base.name} to {quant_type}", file=sys.stderr, flush=True)
    if subprocess.run(command, env=child_environment(), check=False).returncode != 0:
        raise SystemExit(f"quantizing {base} to {quant_type} failed")
    partial.rename(quantized)
    return quantized


def build_inputs(
    workdir: Path, shape_name: str, seed: int, targets: str = "all-linear"
) -> tuple[Path, Path]:
    """Builds or reuses the base model and adapter, in a subprocess.

    Args:
        workdir: Benchmark work folder.
        shape_name: Key of ``synthetic_checkpoints.SHAPES``.
        seed: Build seed.
        targets: Adapter variant (key of ``synthetic_checkpoints.LORA_TARGETS``).

    Returns:
        ``(base_model_folder, adapter_folder)``.

    Raises:
        SystemExit: If the build fails.
    """
    command = [
        sys.executable,
        str(BENCHMARKS_DIR / "synthetic_checkpoints.py"),
        "--shape",
        shape_name,
        "--workdir",
        str(workdir),
        "--seed",
        str(seed),
        "--targets",
        targets,
    ]
    completed = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, env=child_environment(), check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"building the benchmark inputs failed (exit {completed.returncode})")
    paths = json.loads(completed.stdout.strip().splitlines()[-1])
    return Path(paths["base"]), Path(paths["adapter"])


def check_disk_space(
    workdir: Path, shape: synthetic_checkpoints.LlamaShape, seed: int, targets: str = "all-linear"
) -> None:
    """Exits with a message if the work folder's disk lacks room for the run.

    Room is needed for the inputs not built yet plus one merged model (one
    case's output exists at a time).

    Args:
        workdir: Benchmark work folder.
        shape: Model shape.
        seed: Build seed.
        targets: Adapter variant.

    Raises:
        SystemExit: If there is not enough free space.
    """
    base_bytes = sum(spec.byte_size for spec in synthetic_checkpoints.base_tensor_specs(shape))
    adapter_bytes = sum(
        spec.byte_size
        for spec in synthetic_checkpoints.adapter_tensor_specs(shape, targets=targets)
    )
    needed = base_bytes
    if not synthetic_checkpoints.base_model_folder(workdir, shape, seed).is_dir():
        needed += base_bytes
    if not synthetic_checkpoints.adapter_folder(workdir, shape, seed, targets).is_dir():
        needed += adapter_bytes
    free = shutil.disk_usage(workdir).free
    if free < needed * DISK_SPACE_MARGIN:
        raise SystemExit(
            f"not enough disk space in {workdir}: {free / 1e9:.1f} GB free, "
            f"about {needed / 1e9:.1f} GB needed"
        )


def prepare_workdir(workdir: Path) -> None:
    """Creates the work folder and its ``logs/`` and ``outputs/`` folders.

    Args:
        workdir: Benchmark work folder.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    (workdir / "outputs").mkdir(exist_ok=True)


def make_cases(
    base: Path,
    adapter: Path,
    outputs: Path,
    args: argparse.Namespace,
    copy_source: Path | None = None,
) -> list[BenchmarkCase]:
    """Lists the cases to measure, in run order.

    Args:
        base: Base model folder.
        adapter: Adapter folder.
        outputs: Folder holding the cases' output folders.
        args: Parsed command-line arguments.
        copy_source: The folder ``cp -r`` copies (default ``base``); for a quantized
            base, the 16-bit model: a folder the size of the merged output.

    Returns:
        The cases.
    """
    plain_env = child_environment()
    copied = copy_source or base
    cases = [
        BenchmarkCase(
            CP_CASE, ["cp", "-r", str(copied), str(outputs / "cp")], outputs / "cp", plain_env
        )
    ]
    if not args.skip_lora_merge:
        source_dir = REPO_ROOT / "src"
        env = child_environment(source_dir if source_dir.is_dir() else None)
        variants = [(LORA_MERGE_CASE, args.lora_merge_args)]
        variants += [
            (f"{LORA_MERGE_CASE} {label}", f"{args.lora_merge_args} {extra}")
            for label, _, extra in (variant.partition(":") for variant in args.variant)
        ]
        for number, (name, extra) in enumerate(variants):
            output = outputs / f"lora-merge-{number}"
            argv = [
                sys.executable,
                "-m",
                "lora_merge",
                str(base),
                str(adapter),
                str(output),
                "--quiet",
                "--overwrite",
                *shlex.split(extra),
            ]
            cache = outputs / f"digest-cache-{number}"
            cases.append(
                BenchmarkCase(name, argv, output, dict(env, LORA_MERGE_CACHE=str(cache)), [], cache)
            )
        if args.before is not None:
            # The same command, run from an earlier checkout's sources with this interpreter.
            output = outputs / "lora-merge-before"
            before_env = child_environment(args.before.resolve())
            argv = [sys.executable, "-m", "lora_merge", str(base), str(adapter), str(output)]
            argv += ["--quiet", "--overwrite", *shlex.split(args.lora_merge_args)]
            # An earlier checkout without the digest cache ignores the variable.
            cache = outputs / "digest-cache-before"
            before_env["LORA_MERGE_CACHE"] = str(cache)
            cases.append(BenchmarkCase(BEFORE_CASE, argv, output, before_env, [], cache))
    if not args.skip_peft:
        output = outputs / "peft"
        argv = [sys.executable, str(PEFT_REFERENCE_SCRIPT), str(base), str(adapter), str(output)]
        cases.append(BenchmarkCase(PEFT_CASE, argv, output, plain_env))
    return cases


def run_case_once(
    case: BenchmarkCase,
    input_files: Sequence[Path],
    log_dir: Path,
    repeat_index: int | str,
    args: argparse.Namespace,
) -> RunFigures:
    """Prepares the cache and disk state, runs a case once, and cleans up.

    Args:
        case: Case to run.
        input_files: Files of the base model and adapter, read before the run.
        log_dir: Folder for the run's logs.
        repeat_index: Index of this repeat, for the log names.
        args: Parsed command-line arguments.

    Returns:
        The run's figures.
    """
    remove_output(case.output)
    if case.digest_cache is not None and not args.warm_digest_cache:
        remove_output(case.digest_cache)  # a first run: no digest known from an earlier one
    if args.cold:
        os.sync()
        drop_page_cache()
    else:
        read_files_once(input_files)
        os.sync()
    log_stem = log_dir / f"{case.name.split()[0]}-{repeat_index}"
    figures = run_measured(case.argv, case.env, log_stem, args.timeout, args.sample_interval)
    flush_started = time.perf_counter()
    os.sync()
    figures.flush_s = time.perf_counter() - flush_started
    figures.output_bytes = tree_size_bytes(case.output)
    remove_output(case.output)
    return figures


def format_mib(byte_count: int | None) -> str:
    """Formats a byte count in MiB, or "n/a" for ``None``.

    Args:
        byte_count: Bytes.

    Returns:
        The figure rounded to whole MiB.
    """
    return "n/a" if byte_count is None else f"{byte_count / MIB:,.0f}"


def format_seconds(seconds: float) -> str:
    """Formats a duration with 2 decimals, or 3 below one second.

    Args:
        seconds: Duration.

    Returns:
        For example ``"12.34"`` or ``"0.004"``.
    """
    return f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3f}"


def describe_failure(run: RunFigures) -> str:
    """Formats a failed run for the table.

    Args:
        run: The failed run.

    Returns:
        For example ``FAILED (exit 1): ModuleNotFoundError: ...``, with
        characters that would break a Markdown table escaped.
    """
    if run.timed_out:
        status = "timed out"
    elif run.exit_code < 0:
        status = f"signal {-run.exit_code}"
    else:
        status = f"exit {run.exit_code}"
    text = f"FAILED ({status})"
    if run.last_stderr_line:
        text += ": " + run.last_stderr_line.replace("|", "\\|").replace("`", "'")
    return text


def format_ratio(numerator: float, denominator: float) -> str:
    """Formats a ratio with two decimals and an "x".

    Args:
        numerator: Figure of the case.
        denominator: Figure of the reference case.

    Returns:
        For example ``"3.27x"``, or the not-applicable mark if the reference is 0.
    """
    return f"{numerator / denominator:.2f}x" if denominator else NOT_APPLICABLE


def markdown_row(cells: Sequence[str]) -> str:
    """Renders one Markdown table row.

    Args:
        cells: Cell texts, already escaped.

    Returns:
        ``| a | b | ... |``.
    """
    return "| " + " | ".join(cells) + " |"


def markdown_table(cases: Sequence[BenchmarkCase]) -> str:
    """Renders the results table.

    Args:
        cases: Measured cases.

    Returns:
        A Markdown table, one row per case.
    """
    by_name = {case.name: case for case in cases}
    copy_case = by_name.get(CP_CASE)
    if copy_case is not None and copy_case.first_failure is not None:
        copy_case = None
    merge_case = by_name.get(LORA_MERGE_CASE)
    if merge_case is not None and merge_case.first_failure is not None:
        merge_case = None
    rows = [
        markdown_row(TABLE_COLUMNS),
        markdown_row(["---", *["---:"] * (len(TABLE_COLUMNS) - 1)]),
    ]
    for case in cases:
        failure = case.first_failure
        if failure is not None:
            cells = [case.name, describe_failure(failure)]
            rows.append(markdown_row(cells + [NOT_APPLICABLE] * (len(TABLE_COLUMNS) - len(cells))))
            continue
        wall_ratio = disk_ratio = NOT_APPLICABLE
        if copy_case is not None:
            wall_ratio = format_ratio(case.median_wall_s, copy_case.median_wall_s)
            disk_ratio = format_ratio(case.median_on_disk_s, copy_case.median_on_disk_s)
        rss_ratio = NOT_APPLICABLE
        if case.name == PEFT_CASE and merge_case is not None:
            rss_ratio = format_ratio(case.peak_rss_bytes, merge_case.peak_rss_bytes)
        cells = [
            case.name,
            format_seconds(case.median_wall_s),
            format_seconds(case.median_on_disk_s),
            format_mib(case.peak_rss_bytes),
            wall_ratio,
            disk_ratio,
            rss_ratio,
            format_mib(case.sampled_peak_anon_bytes),
        ]
        rows.append(markdown_row(cells))
    return "\n".join(rows)


def package_version(name: str) -> str:
    """Returns an installed distribution's version without importing it.

    Args:
        name: Distribution name.

    Returns:
        The version, or ``"not installed"``.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_summary() -> dict[str, object]:
    """Collects the facts the header and JSON report about this machine.

    Returns:
        CPU counts, memory, and versions of Python and the libraries involved.
    """
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpu_count": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total if psutil else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "safetensors": package_version("safetensors"),
    }


def header_line(
    shape: synthetic_checkpoints.LlamaShape,
    base_bytes: int,
    environment: dict[str, object],
    repeat: int,
    rss_floor_bytes: int,
    targets: str = "all-linear",
    warm_digest_cache: bool = False,
) -> str:
    """Renders the line printed above the table.

    Args:
        shape: Model shape.
        base_bytes: Total size of the base model folder.
        environment: Output of ``environment_summary``.
        repeat: Number of runs per case.
        rss_floor_bytes: RSS floor of the method.
        targets: Adapter variant.
        warm_digest_cache: Whether lora-merge's runs had a warm digest cache.

    Returns:
        One Markdown line.
    """
    memory = environment["memory_bytes"]
    memory_text = f", {memory / 2**30:.0f} GiB RAM" if isinstance(memory, int) else ""
    return (
        f"**{shape.name}** ({shape.description} shape, random bf16 Llama: "
        f"hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, "
        f"{shape.num_hidden_layers} layers, {shape.num_attention_heads} heads, "
        f"{shape.num_key_value_heads} kv heads, vocab {shape.vocab_size}), "
        f"base {base_bytes:,} bytes ({base_bytes / 1e9:.2f} GB); "
        f"LoRA r={synthetic_checkpoints.LORA_RANK} on "
        f"{', '.join(synthetic_checkpoints.LORA_TARGETS[targets])} of every layer; "
        f"{environment['usable_cpu_count']} CPU cores{memory_text}; "
        f"torch {environment['torch']}, transformers {environment['transformers']}, "
        f"peft {environment['peft']}, Python {environment['python']}; "
        f"median wall of {repeat} run(s); RSS floor of the method "
        f"{format_mib(rss_floor_bytes)} MB; lora-merge's digest cache "
        f"{'warm (re-runs)' if warm_digest_cache else 'empty before every run (first runs)'}."
    )


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments, without the program name; ``None`` means ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        description="Benchmark lora-merge against cp -r and a PEFT merge (see module docstring).",
    )
    parser.add_argument(
        "--shape",
        choices=list(synthetic_checkpoints.SHAPES),
        default="1b",
        help="1b = TinyLlama-1.1B, 3b = OpenLLaMA-3B, 7b = Llama-2-7B, tiny = smoke test",
    )
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache and scratch folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per case; the table shows the median wall"
    )
    parser.add_argument("--json", type=Path, help="also write every raw figure to this JSON file")
    parser.add_argument(
        "--skip-lora-merge", action="store_true", help="do not run the lora-merge case"
    )
    parser.add_argument("--skip-peft", action="store_true", help="do not run the PEFT case")
    parser.add_argument(
        "--quantize",
        choices=["nf4", "fp4"],
        help="merge into a bitsandbytes 4-bit (double quant) copy of the base; cp -r then "
        "copies the 16-bit base, a folder the size of the merged output",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every run (needs root) instead of reading the "
        "inputs into it: inputs then come from the disk",
    )
    parser.add_argument(
        "--targets",
        choices=sorted(synthetic_checkpoints.LORA_TARGETS),
        default="all-linear",
        help="which projections of every layer carry LoRA (q-v: q_proj and v_proj only)",
    )
    parser.add_argument(
        "--lora-merge-args",
        default="",
        help="extra options for every lora-merge run, e.g. '--max-memory 256MB'",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:OPTIONS",
        help="an extra lora-merge case with more options, measured in the same run, e.g. "
        "'no hashing:--no-hash-inputs' (repeatable)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="SRC",
        help="also run lora-merge from an earlier checkout's src/ folder (e.g. a git worktree "
        "of the previous release), interleaved with the others: before and after in one run",
    )
    parser.add_argument(
        "--warm-digest-cache",
        action="store_true",
        help="measure re-runs: each lora-merge case's digest cache (LORA_MERGE_CACHE) is filled "
        "by one untimed run and kept across its repeats, so the inputs' sha256 comes from it; "
        "by default every run starts with an empty cache (first-run figures)",
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds after which a run is killed (default: none)"
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.1,
        help="seconds between psutil memory samples; 0 disables sampling",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark.

    Args:
        argv: Arguments, without the program name; ``None`` means ``sys.argv``.

    Returns:
        0, or 1 if any case failed.
    """
    args = parse_arguments(argv)
    shape = synthetic_checkpoints.SHAPES[args.shape]
    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    check_disk_space(workdir, shape, args.seed, args.targets)
    log_dir = workdir / "logs"
    outputs = workdir / "outputs"

    print(f"building or reusing {args.shape} inputs in {workdir}", file=sys.stderr, flush=True)
    base, adapter = build_inputs(workdir, args.shape, args.seed, args.targets)
    copy_source = None
    if args.quantize:
        copy_source, base = base, build_quantized_base(base, args.quantize)
        args.skip_peft = True  # PEFT cannot save a model merged into a 4-bit base (see README)
    input_files = files_under([base, adapter])
    base_bytes = tree_size_bytes(base)
    rss_floor_bytes = measure_rss_floor(log_dir)
    cases = make_cases(base, adapter, outputs, args, copy_source)
    if args.warm_digest_cache:
        # Inputs written less than 2 s before a run are hashed but not cached (the cache's
        # rule on files still being written): inputs built just now must settle first.
        newest_ns = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in input_files)
        time.sleep(max(0.0, (newest_ns - time.time_ns()) / 1e9 + 3.0))
        for case in cases:
            if case.digest_cache is not None:
                remove_output(case.digest_cache)
                print(f"[warm-up] {case.name} ...", end=" ", file=sys.stderr, flush=True)
                warm_up = run_case_once(case, input_files, log_dir, "warm-up", args)
                print(f"{format_seconds(warm_up.wall_s)} s (not counted)", file=sys.stderr)

    for repeat_index in range(args.repeat):
        for case in cases:
            print(
                f"[{repeat_index + 1}/{args.repeat}] {case.name} ...",
                end=" ",
                file=sys.stderr,
                flush=True,
            )
            run = run_case_once(case, input_files, log_dir, repeat_index, args)
            case.runs.append(run)
            outcome = "ok" if run.succeeded else describe_failure(run)
            print(
                f"{format_seconds(run.wall_s)} s, {format_mib(run.max_rss_bytes)} MB, {outcome}",
                file=sys.stderr,
                flush=True,
            )

    environment = environment_summary()
    print(
        header_line(
            shape,
            base_bytes,
            environment,
            args.repeat,
            rss_floor_bytes,
            args.targets,
            args.warm_digest_cache,
        )
    )
    print()
    print(markdown_table(cases))
    if any(case.first_failure for case in cases):
        print(f"\nLogs of failed runs: {log_dir}", file=sys.stderr)

    if args.json:
        report = {
            "shape": asdict(shape),
            "base_model": str(base),
            "adapter": str(adapter),
            "base_bytes": base_bytes,
            "adapter_bytes": tree_size_bytes(adapter),
            "rss_floor_bytes": rss_floor_bytes,
            "environment": environment,
            "repeat": args.repeat,
            "digest_cache": "warm" if args.warm_digest_cache else "empty before every run",
            "cases": [
                {
                    "name": case.name,
                    "argv": case.argv,
                    "median_wall_s": case.median_wall_s,
                    "median_on_disk_s": case.median_on_disk_s,
                    "median_user_s": case.median_user_s,
                    "median_system_s": case.median_system_s,
                    "peak_rss_bytes": case.peak_rss_bytes,
                    "runs": [asdict(run) for run in case.runs],
                }
                for case in cases
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(case.first_failure for case in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
