"""How the command ends: one line on stderr and a documented exit code for each error.

As huggingface_hub's ``cli/_errors.py`` formats its errors in one place, every
:class:`~lora_merge.errors.LoraMergeError` becomes ``lora-merge: error: ...``
and its exit code here and only here (a traceback only with ``LORA_MERGE_DEBUG``
set); lora-merge's warnings become one line each; SIGTERM and Ctrl-C interrupt
the run as :class:`~lora_merge.errors.MergeInterrupted`.
"""

from __future__ import annotations

import os
import signal
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

import typer

from lora_merge.errors import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    LoraMergeError,
    LoraMergeWarning,
    MergeInterrupted,
)

DEBUG_ENV = "LORA_MERGE_DEBUG"


def exit_codes_epilog() -> str:
    """The exit-code table of :mod:`lora_merge.errors`, one code per line, for ``--help``."""
    lines = [f"{code:>3}  {meaning}" for code, meaning in EXIT_CODES]
    return "\n".join(["Exit codes:", *lines])


@contextmanager
def errors_as_exit_codes() -> Iterator[None]:
    """Inside the block, SIGTERM and Ctrl-C interrupt the run as :class:`MergeInterrupted`
    (the library removes its partial output on the way out), and every error ends the
    command with one line on stderr and its exit code. SIGTERM's handler is restored after."""
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    except KeyboardInterrupt:
        _fail(MergeInterrupted("SIGINT", EXIT_SIGINT))
    except LoraMergeError as err:
        _fail(err)
    except Exception as err:  # a bug: say so in one line, with the way to get details
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        typer.echo(
            f"lora-merge: internal error: {type(err).__name__}: {err} (please report it; "
            f"set {DEBUG_ENV}=1 for a traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_INTERNAL) from err
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Inside the block, warnings from lora-merge print as one line on stderr; others as
    the printer in place before it prints them. That printer is restored on the way out."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, LoraMergeWarning):
            typer.echo(f"lora-merge: warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise MergeInterrupted("SIGTERM", EXIT_SIGTERM)


def _fail(err: LoraMergeError) -> NoReturn:
    if os.environ.get(DEBUG_ENV):
        traceback.print_exc()
    typer.echo(f"lora-merge: error: {err}", err=True)
    raise typer.Exit(err.exit_code)
