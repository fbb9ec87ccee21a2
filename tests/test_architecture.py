"""The shape of src/lora_merge: one-way floors and no import circle.

The map of the house, its floors and the conventions they follow are in
docs/architecture.md of this repository. Data flows one way: resolve inputs ->
read adapter -> plan -> stream -> finish, over the I/O and the maths, with the
CLI on top. The floors below say it explicitly; a module may import from its own
floor or any floor beneath, never from above. The import graph is drawn with
``ast`` from the source files (every import, including ones inside functions or
``if TYPE_CHECKING``: each is a dependency), so nothing is imported to run the
check.

Long functions and long modules are reported as warnings, not failures: a length
finds a place worth reading again, it is not a target to trim comments to.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

PACKAGE = "lora_merge"
SOURCE = Path(__file__).resolve().parent.parent / "src" / PACKAGE
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


class LongCodeWarning(UserWarning):
    """A function or module longer than the limits above: worth reading again, not an error."""


# Bottom to top. A name covers the module or package of that name and everything in it.
FLOORS: tuple[tuple[str, ...], ...] = (
    # Errors, the version, and the dtypes a plan names (torch-free values every room may name).
    ("lora_merge.errors", "lora_merge._version", "lora_merge.dtypes"),
    # Each option's value type (enums, sizes, device, --part): every room may name them.
    ("lora_merge.options.values",),
    # The maths is pure (tensors in, tensors out): it never reads or writes files.
    ("lora_merge.compute",),
    # File formats and bounded reads and writes; dequantizing on read uses the maths.
    ("lora_merge.io",),
    ("lora_merge.inputs",),
    ("lora_merge.adapter",),
    ("lora_merge.plan",),
    ("lora_merge.stream",),
    ("lora_merge.finish",),
    # What a caller writes, and its one check: it names combination methods (adapter)
    # and the CPUs the process may use (io.cpus); every step below receives its values.
    ("lora_merge.options",),
    # The run, each floor a step of it: everything before writing, shared by the
    # preview and the merge (and what starts before torch: hashing and copying ahead);
    # the shards; OUT's folder; the whole run and its summary.
    ("lora_merge.run.prepare", "lora_merge.run.hash_ahead", "lora_merge.run.copy_ahead"),
    ("lora_merge.run.preview", "lora_merge.run.shards"),
    ("lora_merge.run.folder",),
    ("lora_merge.run.merge", "lora_merge.run"),
    # The public face: merge() and preview_merge().
    ("lora_merge.api",),
    # The command line: its options and the text it prints about a run, then the command.
    ("lora_merge.cli.option_types", "lora_merge.cli.report", "lora_merge.cli.exit_codes"),
    ("lora_merge.cli", "lora_merge.__main__", "lora_merge"),
)


def module_name(path: Path, root: Path, package: str) -> str:
    """``pkg.sub.mod`` for ``root/sub/mod.py``; a package's ``__init__.py`` is the package."""
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names resolved to modules where they are)."""
    modules = source_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_known(alias.name, modules) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, is_package)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in modules else _known(base, modules))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - node.level + 1]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _known(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``name`` that is one of our modules ("" for other packages)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def floor_of(module: str, floors: Sequence[Sequence[str]]) -> int | None:
    """The index of the floor that holds ``module`` (the longest name that covers it wins)."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(floors):
        for name in names:
            covers = module == name or (module.startswith(f"{name}.") and "." in name)
            if covers and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def upward_imports(graph: dict[str, set[str]], floors: Sequence[Sequence[str]]) -> list[str]:
    """Every import from a lower floor into a higher one, and every module with no floor."""
    problems = [f"{m} is on no floor" for m in sorted(graph) if floor_of(m, floors) is None]
    for importer, imported in sorted(graph.items()):
        low = floor_of(importer, floors)
        for target in sorted(imported):
            high = floor_of(target, floors)
            if low is not None and high is not None and high > low:
                problems.append(f"{importer} (floor {low}) imports {target} (floor {high})")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def long_functions(files: Iterable[Path], root: Path, limit: int) -> list[str]:
    """``file:function (n lines)`` for every function or method longer than ``limit``.

    A function's lines run from its ``def`` to its last line, docstring included.
    """
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root)}:{node.name} ({length} lines)")
    return found


def long_modules(files: Iterable[Path], root: Path, limit: int) -> list[str]:
    """``file (n lines)`` for every module longer than ``limit`` lines."""
    found = []
    for path in files:
        length = len(path.read_text(encoding="utf-8").splitlines())
        if length > limit:
            found.append(f"{path.relative_to(root)} ({length} lines)")
    return found


def test_nothing_imports_up_the_floors():
    problems = upward_imports(import_graph(SOURCE, PACKAGE), FLOORS)
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    cycles = import_cycles(import_graph(SOURCE, PACKAGE))
    assert not cycles, "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_long_functions_and_modules_are_reported_as_warnings():
    """Over the limits is a question for a reader (docs/architecture.md), so a warning."""
    files = source_files(SOURCE, PACKAGE).values()
    for found, limit, what in (
        (long_functions(files, SOURCE, MAX_FUNCTION_LINES), MAX_FUNCTION_LINES, "function"),
        (long_modules(files, SOURCE, MAX_MODULE_LINES), MAX_MODULE_LINES, "module"),
    ):
        for place in found:
            warnings.warn(f"{what} over {limit} lines: {place}", LongCodeWarning, stacklevel=1)


def test_the_checks_see_what_they_must_refuse(tmp_path):
    """The checks above are not vacuous: on a small package built to break every rule,
    each rule finds its breach, and the graph resolves every spelling of an import."""
    root = tmp_path / "pkg"
    (root / "low").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/base.py": "import os\nfrom pkg.high import thing\n",  # runs up the floors
        "low/sibling.py": "from . import base\nfrom .base import os\n",
        "high.py": "from pkg.low import sibling\nimport pkg.low.base\n",
        "a.py": "def f():\n    from pkg import b\n",  # a circle, through a local import
        "b.py": "from .a import f\n",
        "long.py": "def long():\n" + "    x = 1\n" * 80,
    }
    for name, text in files.items():
        (root / name).write_text(text)
    graph = import_graph(root, "pkg")
    assert graph["pkg.low.base"] == {"pkg.high"}
    assert graph["pkg.low.sibling"] == {"pkg.low.base"}
    assert graph["pkg.high"] == {"pkg.low.sibling", "pkg.low.base"}
    floors = (("pkg.low",), ("pkg.high", "pkg.a", "pkg.b"), ("pkg",))
    assert upward_imports(graph, floors) == [
        "pkg.long is on no floor",
        "pkg.low.base (floor 0) imports pkg.high (floor 1)",
    ]
    assert sorted(import_cycles(graph)) == [
        ["pkg.a", "pkg.b"],
        ["pkg.high", "pkg.low.base", "pkg.low.sibling"],
    ]
    sources = source_files(root, "pkg").values()
    assert long_functions(sources, root, 80) == ["long.py:long (81 lines)"]
    assert long_modules(sources, root, 80) == ["long.py (81 lines)"]
