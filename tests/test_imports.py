"""The package's import rules, read from the source with ast: every module imports, the import graph of
segue has no cycle (lazy imports inside functions included; ``TYPE_CHECKING`` blocks excluded), nothing
below ``segue.loader`` imports it, and no module imports another module's private (``_x``) name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "segue"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
IMPORTABLE = sorted(n for n in MODULES if not n.endswith("__main__"))  # __main__ runs the CLI


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported segue module, names taken from it) for every import statement of module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "segue"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "segue":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, []) for s in submodules]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        deps = set()
        for target, _ in imports(name):
            # importing segue.a.b runs segue.a's __init__ too
            parts = target.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        edges[name] = {d for d in deps if d in MODULES and d != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


@pytest.mark.parametrize("name", IMPORTABLE)
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])
    # the checker itself finds a cycle where there is one
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_below_the_loader_imports_it() -> None:
    below = [n for n in MODULES if n.startswith(("segue.placement", "segue.accel", "segue.models", "segue.sampling"))]
    below += ["segue.pipeline", "segue.checkpoint", "segue.dist"]
    edges = graph()
    users = [n for n in below if "segue.loader" in edges[n]]
    assert not users, users


def test_no_private_name_is_imported_across_modules() -> None:
    found = [
        f"{name} imports {target}.{n}"
        for name in MODULES
        for target, names in imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not found, found
