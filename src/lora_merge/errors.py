"""The one error family users see, and the exit codes it maps to.

Every mistake a user can make (a wrong path, an adapter for another model, an
existing output folder) is raised as a :class:`LoraMergeError` subclass. The CLI
turns it into one line on stderr and the subclass's exit code; nothing else in
the package prints errors. :data:`EXIT_CODES` is the one table of exit codes:
the CLI's ``--help`` prints it, and the README's table repeats it (a test keeps
the two the same).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an exception that is not a LoraMergeError
EXIT_USAGE = 2  # bad command line (Typer/Click's own code)
EXIT_INPUT_NOT_FOUND = 3
EXIT_INVALID_INPUT = 4
EXIT_ADAPTER_MISMATCH = 5
EXIT_OUTPUT_REFUSED = 6
EXIT_NONFINITE = 7
EXIT_VERIFICATION_FAILED = 8
EXIT_PUSH_FAILED = 9  # OUT is complete; only the upload to the Hub failed
EXIT_SIGINT = 130  # 128 + SIGINT, the shell convention
EXIT_SIGTERM = 143  # 128 + SIGTERM

# (code, meaning): what each exit code tells a user or a script.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "merged"),
    (
        EXIT_INTERNAL,
        "internal error (a bug: please report it; LORA_MERGE_DEBUG=1 prints the traceback)",
    ),
    (
        EXIT_USAGE,
        "bad command line (unknown option, a value that is not one of its choices or an "
        "unparseable size, options that contradict each other)",
    ),
    (EXIT_INPUT_NOT_FOUND, "BASE, ADAPTER, a weights file or a shard named by the index not found"),
    (
        EXIT_INVALID_INPUT,
        "invalid or unsupported input (corrupt safetensors, bad adapter_config.json, not LoRA, "
        "pickle with code, a quantization method or layout lora-merge does not read, a "
        "combination of adapter features lora-merge refuses)",
    ),
    (
        EXIT_ADAPTER_MISMATCH,
        "the adapter does not fit the base (unknown module, shape mismatch), or combined "
        "adapters disagree on a module's shape",
    ),
    (
        EXIT_OUTPUT_REFUSED,
        "OUT refused (exists and not empty without --overwrite, inside or containing an input, "
        "disk too small or full)",
    ),
    (
        EXIT_NONFINITE,
        "NaN or Inf in the adapter or produced by the merge (refused unless --allow-nonfinite, "
        "as PEFT's safe_merge refuses)",
    ),
    (
        EXIT_VERIFICATION_FAILED,
        "--verify found the output disagreeing with the plan or the inputs (OUT is not created)",
    ),
    (
        EXIT_PUSH_FAILED,
        "--push-to-hub failed after the merge (OUT is complete and kept; the message says how "
        "to upload it alone; with --low-disk nothing is committed, no OUT is left, and "
        "--resume skips the shards already uploaded)",
    ),
    (EXIT_SIGINT, "interrupted by Ctrl-C (partial output removed)"),
    (EXIT_SIGTERM, "terminated by SIGTERM (partial output removed)"),
)


class LoraMergeError(Exception):
    """Base class of every error meant for the user.

    The message is a full sentence that names the file or key involved, the rule
    that was broken and what to do about it.
    """

    exit_code: int = EXIT_INTERNAL


class UsageError(LoraMergeError):
    """A bad option value, or options that contradict each other (e.g. two weights for
    three adapters): found by :func:`lora_merge.options.checked_options` before any work."""

    exit_code = EXIT_USAGE


class InputNotFoundError(LoraMergeError):
    """BASE, ADAPTER, a weights file or a shard named in an index is missing."""

    exit_code = EXIT_INPUT_NOT_FOUND


class InvalidInputError(LoraMergeError):
    """An input exists but cannot be used: corrupt file, bad JSON, unsupported adapter type."""

    exit_code = EXIT_INVALID_INPUT


class AdapterMismatchError(LoraMergeError):
    """The adapter does not fit the base: unknown keys or shapes that differ."""

    exit_code = EXIT_ADAPTER_MISMATCH


class OutputError(LoraMergeError):
    """OUT cannot be written: it exists, it lies inside an input, or the disk is too small."""

    exit_code = EXIT_OUTPUT_REFUSED


class NonFiniteError(LoraMergeError):
    """NaN or Inf in the adapter, or produced by the merge (refused unless --allow-nonfinite)."""

    exit_code = EXIT_NONFINITE


class VerificationError(LoraMergeError):
    """``--verify`` found the written output disagreeing with the plan or the inputs."""

    exit_code = EXIT_VERIFICATION_FAILED


class PushError(LoraMergeError):
    """``--push-to-hub`` failed after OUT was written (OUT is kept)."""

    exit_code = EXIT_PUSH_FAILED


class MergeInterrupted(LoraMergeError):
    """SIGINT or SIGTERM arrived; the partial output has been removed."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"interrupted by {signal_name}; no output was written")
        self.exit_code = exit_code


class LoraMergeWarning(UserWarning):
    """Something a user should know that does not stop the merge (printed on stderr by the CLI)."""
