"""The package's layout holds: each part imports only parts below it, no file imports itself back
through others, and no source file outgrows a read. Every import counts, also the ones inside
functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "facerestore_cli"
#: The parts, lowest first (docs/DESIGN.md): a part may import only parts before it.
ORDER = [
    "errors",
    "paths",
    "devices",
    "configfile",
    "io",
    "faces",
    "models",
    "metrics",
    "rewards",
    "data",
    "export",
    "restore",
    "train",
    "evaluate",
    "commands",
    "cli",
]
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports, resolved to the deepest module that exists."""
    me, is_package = module_name(path), path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = me.split(".") if is_package else me.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            names.update([base] + [f"{base}.{a.name}" for a in node.names])
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != me and name != PACKAGE.name and not me.startswith(name + "."):
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imported_modules(p, set(files)) for m, p in files.items()}


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_every_part_is_in_the_order() -> None:
    parts = {part(m) for m in import_graph()} - {"__init__"}
    assert parts == set(ORDER), f"parts not in ORDER: {parts - set(ORDER)}; in ORDER but gone: {set(ORDER) - parts}"


def test_each_part_imports_only_parts_below_it() -> None:
    upward = sorted(
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if part(m) != "__init__" and part(t) != "__init__" and ORDER.index(part(t)) > ORDER.index(part(m))
    )
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycle_between_files() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_source_file_is_at_most_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by what its parts do"
