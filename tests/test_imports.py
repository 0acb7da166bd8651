"""No import cycles in nanoseek: every module imports in a fresh interpreter, and the import graph (read
with `ast`) has no cycle.

A cycle that happens to import today breaks as soon as someone imports the modules in another order
(a name is missing from a half-initialised module), so the graph is checked, not only the imports.
Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first: those packages are dependencies too,
except the importer's own packages (a package's `__init__` importing its submodules is how packages work).
Imports inside functions count as well: one that closes a cycle only hides it, and it breaks as soon as
someone moves the import up. The exception is the command line (`LAZY_IMPORTERS`), which imports the
library inside functions so that `nanoseek --help` stays fast, and which no library module imports.
Imports under `if TYPE_CHECKING:` never run and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nanoseek"
# Modules (and packages) whose imports inside functions do not count: see the docstring.
LAZY_IMPORTERS = ("nanoseek.cli", "nanoseek.commands")


def module_files(root: Path = ROOT / PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (packages by their `__init__`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(tree: ast.Module, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported, and with `in_functions` those inside its
    functions and methods too; never those under TYPE_CHECKING."""
    found = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if in_functions:
                    found.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(tree.body)
    return found


def _imported(name: str, path: Path, files: dict[str, Path], in_functions: bool) -> list[tuple[str, bool]]:
    """(module, explicit) for each package module that `name`'s imports name. Explicit: a name is read
    from that module's namespace (`from pkg import function`), so it must be fully imported."""
    out = []
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), in_functions):
        if isinstance(node, ast.Import):  # `import a.b` binds `a`: it reads nothing of a package being imported
            out += [(alias.name, False) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1 more
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"  # imported on its own, even from a half-imported package
            out.append((submodule, False) if submodule in files else (base, True))
    return out


def import_graph(files: dict[str, Path], lazy_importers: tuple[str, ...] = LAZY_IMPORTERS) -> dict[str, set[str]]:
    """{module: the package modules it imports (that must be imported before its body or function can run)}."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        own = {name, *_ancestors(name)}  # being imported already when this body runs
        in_functions = not any(name == lazy or name.startswith(lazy + ".") for lazy in lazy_importers)
        needs = set()
        for target, explicit in _imported(name, path, files, in_functions):
            if target in files and (explicit or target not in own):
                needs.add(target)
            needs.update(a for a in _ancestors(target) if a in files and a not in own)
        graph[name] = needs - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_package_import_graph_has_no_cycle() -> None:
    graph = import_graph(module_files())
    assert "nanoseek.rewards" in graph and "nanoseek.tasks.base" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_cycles(tmp_path: Path) -> None:
    """The checker against hand-made packages whose answer is known."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.leaf import x\n")  # a package importing its child: fine
    (pkg / "sub" / "leaf.py").write_text("from pkg.sub import other\nx = 1\n")
    (pkg / "sub" / "other.py").write_text("def f():\n    import pkg.a\n")  # inside a function: an edge, no cycle
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    files = module_files(pkg)
    assert find_cycle(import_graph(files)) is None
    (pkg / "b.py").write_text("try:\n    from pkg.sub.leaf import x\nexcept ImportError:\n    pass\n")
    (pkg / "sub" / "other.py").write_text("from pkg import a\n")  # -> a -> b -> pkg.sub (runs sub/__init__)
    cycle = find_cycle(import_graph(files))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) >= {"pkg.a", "pkg.b", "pkg.sub"}, cycle
    (pkg / "b.py").write_text("from . import a\n")  # relative imports resolve too
    assert find_cycle(import_graph({"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}))


def test_imports_inside_functions_count(tmp_path: Path) -> None:
    """A cycle closed by an import inside a function (or a method) is a cycle, except in a lazy importer."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("class B:\n    def f(self):\n        if True:\n            from pkg.a import x\n")
    files = module_files(pkg)
    assert find_cycle(import_graph(files, lazy_importers=())) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle(import_graph(files, lazy_importers=("pkg.b",))) is None
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n")
    assert find_cycle(import_graph(files, lazy_importers=())) is None


@pytest.mark.parametrize("first", ["nanoseek.tasks", "nanoseek.rewards", "nanoseek.eval", "nanoseek.cli"])
def test_every_module_imports_in_a_fresh_interpreter(first: str) -> None:
    """Each module imports (a missing name in a half-imported module would raise), starting from `first`.
    (`__main__` modules run the program when imported: the graph test covers them.)"""
    names = [first, *sorted(n for n in module_files() if n != first and not n.endswith(".__main__"))]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    subprocess.run([sys.executable, "-c", code, *names], check=True, timeout=300, cwd=ROOT)
