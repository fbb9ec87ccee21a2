"""The installed ``lora-merge`` run as a user runs it, and what a refusal must leave behind.

A refusal is one line on stderr (``lora-merge: error: ...``) with its exit code, and
neither OUT nor a staging folder beside it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from merge_process import LORA_MERGE


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, no terminal (so no progress bar), no debug tracebacks."""
    environment = {k: v for k, v in (env or os.environ).items() if k != "LORA_MERGE_DEBUG"}
    return subprocess.run(
        [LORA_MERGE, *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def model_files(folder: Path) -> dict[str, bytes]:
    """The files of a merged model that depend on the merge (the card records the command line)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def assert_nothing_written(parent: Path, out: Path) -> None:
    """Neither OUT nor a staging folder of it exists in ``parent``."""
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if "lora-merge-partial" in p.name]


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """stderr is one ``lora-merge: error:`` line holding every one of ``words``; return it."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]
