"""The code's shape, checked: imports flow one way (no cycle, lazy imports included), no private name is imported
from another package, and every function stays short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package's name is its __init__)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, at any depth (lazy ones too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base not in modules:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found.append((base, [n for n in names if f"{base}.{n}" not in modules], node.lineno))
            found += [(m, [], node.lineno) for m in submodules]
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: {m for m, _, _ in imports_of(name, path, modules) if m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_src():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    """The check itself: a cycle closed by an import inside a function is found (as in the old evaluate <-> train)."""
    pkg = tmp_path / "pkg"
    (pkg / "train").mkdir(parents=True)
    (pkg / "evaluate").mkdir()
    for folder in (pkg, pkg / "train", pkg / "evaluate"):
        (folder / "__init__.py").write_text("")
    (pkg / "train" / "collate.py").write_text("def f():\n    from ..evaluate.likelihood import g\n")
    (pkg / "evaluate" / "likelihood.py").write_text("from ..train import collate\n")
    assert find_cycle(import_graph(tmp_path)) == ["pkg.evaluate.likelihood", "pkg.train.collate", "pkg.evaluate.likelihood"]
    (pkg / "train" / "collate.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_private_name_imported_from_another_package():
    modules = module_names(SRC)
    offenders = []
    for name, path in modules.items():
        for target, names, line in imports_of(name, path, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _package(target) != _package(name):
                offenders.append(f"{path.relative_to(SRC)}:{line} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)


MAX_FUNCTION_LINES = 60


def long_functions(root: Path) -> list[str]:
    """Every function or method under `root` longer than MAX_FUNCTION_LINES (decorators and docstring included)."""
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return long


def test_every_function_in_src_stays_short():
    long = long_functions(SRC / "instructune")
    assert not long, "\n".join(long)


def test_the_length_check_finds_a_long_method_in_a_nested_package(tmp_path):
    """The check itself: a method of 61 lines two folders down is found, one of 60 is not."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    body = "".join(f"        x{i} = {i}\n" for i in range(59))
    (tmp_path / "pkg" / "sub" / "m.py").write_text(f"class A:\n    def ok(self):\n{body}\n    def long(self):\n{body}        return 1\n")
    assert long_functions(tmp_path) == ["pkg/sub/m.py:63 long (61 lines)"]
