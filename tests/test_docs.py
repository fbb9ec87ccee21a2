"""The README and docs/ stay true: every option documented, every link resolves, every command parses.

- Every option of ``lora-merge`` (the command's own parameter list, which is what
  ``--help`` prints) is named somewhere in README.md or docs/*.md.
- Every relative link resolves: the file exists and, where the link names an
  anchor, the target file has a heading with that anchor (GitHub's rule: lower
  case, punctuation dropped, spaces to hyphens).
- Every ``lora-merge`` command in a code block parses with the command's own
  parser (click, under Typer). The cheap ones (local folders, nothing pushed,
  no part of a split merge) also run with ``--dry-run`` on the handmade tiny
  model, and must succeed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from handmade_checkpoints import adapter_tensors, write_adapter, write_base
from typer.testing import CliRunner

from lora_merge.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"^(?:\$ )?lora-merge(?=\s)")
# Options whose run needs more than a tiny local merge: the Hub, other processes, an earlier run.
NOT_CHEAP = {"--push-to-hub", "--low-disk", "--part", "--resume", "--unmerge", "--rank"}


def outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside a fenced code block."""
    lines, fence = [], ""
    for line in text.splitlines():
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if opening and not fence:
            fence = opening.group(1)
        elif fence and line.strip() == fence:
            fence = ""
        elif not fence:
            lines.append(line)
    return lines


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, continuation lines (``\\``) joined."""
    lines, fence, pending = [], "", ""
    for line in text.splitlines():
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if opening and not fence:
            fence = opening.group(1)
        elif fence and line.strip() == fence:
            fence = ""
        elif fence:
            pending += line.strip().removesuffix("\\").strip() + " "
            if not line.rstrip().endswith("\\"):
                lines.append(pending.strip())
                pending = ""
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {
        anchor(match.group(1))
        for line in outside_code(path.read_text(encoding="utf-8"))
        if (match := re.match(r"^#{1,6} (.*)", line))
    }


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after ``lora-merge``) for every command in a code block."""
    commands = []
    for path in DOCUMENTS:
        for line in code_lines(path.read_text(encoding="utf-8")):
            if COMMAND.match(line):
                words = shlex.split(COMMAND.sub("", line, count=1), comments=True)
                if ">" in words:  # the shell's redirection, not the command's
                    words = words[: words.index(">")]
                commands.append((f"{path.relative_to(ROOT)}: {line}", words))
    return commands


COMMANDS = documented_commands()


def test_the_docs_hold_commands_and_links_to_check() -> None:
    """The checks below are not vacuous: the README's commands and its links to docs/ are found."""
    assert len(COMMANDS) >= 20
    readme = "\n".join(outside_code((ROOT / "README.md").read_text(encoding="utf-8")))
    assert len(LINK.findall(readme)) >= 15


def test_every_option_of_the_command_is_documented() -> None:
    command = typer.main.get_command(app)
    text = "\n".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
    options = {
        name
        for parameter in command.params
        if not getattr(parameter, "hidden", False)
        for name in parameter.opts
        if name.startswith("--")
    }
    assert len(options) > 20, options
    undocumented = sorted(
        option for option in options if not re.search(rf"{re.escape(option)}(?![\w-])", text)
    )
    assert not undocumented, f"in --help but in neither README.md nor docs/: {undocumented}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    broken = []
    for line in outside_code(document.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
                continue
            file_part, _, fragment = target.partition("#")
            linked = (document.parent / file_part).resolve() if file_part else document
            if not linked.exists():
                broken.append(f"{target}: no such file")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, f"{document.relative_to(ROOT)}:\n" + "\n".join(broken)


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_documented_command_parses(where: str, words: list[str]) -> None:
    """click's own parser accepts it: known options, values of the right type and choice."""
    typer.main.get_command(app).make_context("lora-merge", list(words))


def is_cheap(words: list[str]) -> bool:
    """Local folders in, nothing pushed or split: a --dry-run on the tiny model says it works."""
    positional = [word for word in words if not word.startswith("-")]
    local = all(word.startswith((".", "/")) or word == "OUT" for word in positional[:1])
    return local and not NOT_CHEAP.intersection(words) and "merged_4bit" not in words


CHEAP = [(where, words) for where, words in COMMANDS if is_cheap(words)]


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The handmade base and three adapters of the same rank (for the combinations)."""
    root = tmp_path_factory.mktemp("docs")
    write_base(root / "base")
    adapters = []
    for seed in range(3):
        write_adapter(root / f"adapter{seed}", adapter_tensors(seed=seed + 1))
        adapters.append(root / f"adapter{seed}")
    return root / "base", adapters


@pytest.mark.parametrize(("where", "words"), CHEAP, ids=[where for where, _ in CHEAP])
def test_every_cheap_documented_command_dry_runs_on_the_tiny_model(
    where: str, words: list[str], tiny_inputs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """BASE, each ADAPTER and OUT replaced by the tiny model's; the options kept as written."""
    base, adapters = tiny_inputs
    positional = [
        word for word in words if not word.startswith("-") and word not in values_of(words)
    ]
    options = words[len(positional) :] if words[: len(positional)] == positional else None
    assert options is not None, f"{where}: put BASE ADAPTER OUT before the options"
    assert len(positional) >= 3, where
    inputs = [str(base), *(str(adapter) for adapter in adapters[: len(positional) - 2])]
    result = CliRunner().invoke(
        app, [*inputs, str(tmp_path / "out"), *options, "--dry-run"], catch_exceptions=False
    )
    assert result.exit_code == 0, f"{where}\n{result.output}"
    assert not (tmp_path / "out").exists()


def values_of(words: list[str]) -> set[str]:
    """The words that are an option's value (the word after an option that takes one)."""
    command = typer.main.get_command(app)
    takes_value = {
        name
        for parameter in command.params
        if not getattr(parameter, "is_flag", False) and parameter.opts
        for name in parameter.opts
        if name.startswith("-")
    }
    return {words[i + 1] for i, word in enumerate(words[:-1]) if word in takes_value}
