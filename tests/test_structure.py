"""The shape of the code: no module over 400 lines, no function over 80, no import cycle between modules.

The import graph is read from the source (ast), every `import` statement counted wherever it stands (a function-
level import is an edge too: it is how cycles used to hide), except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actcache", "sae_cli")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules() -> dict[str, Path]:
    """Dotted name -> path of every module of the two packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports (a package's __init__ imports of itself excluded)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops; a package's
    __init__ importing its own submodules is not a cycle."""
    mods = modules()
    known = set(mods)
    graph = {n: imports_of(n, p, known) for n, p in mods.items()}
    # A submodule always runs its package's __init__ first; that edge is implicit and not a cycle by itself.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_import_cycle() -> None:
    assert import_cycles() == []


def test_every_module_imports_alone() -> None:
    """Each module imported first, with no module of the two packages loaded before it (one fresh interpreter;
    the third-party modules stay loaded between them): a cycle that depends on import order shows here."""
    code = (
        "import importlib, sys, traceback\n"
        f"names = {sorted(modules())!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('actcache', 'sae_cli')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append((name, repr(e)))\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_over_400_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_MODULE_LINES} == {}


def test_no_function_over_80_lines() -> None:
    assert [f for p in modules().values() for f in long_functions(p)] == []


RUN_PATH = (
    "cli", "cli_common", "cli_sweep", "run", "sweep", "sweep_config", "summary", "data", "config", "io",
    "metrics", "pareto", "registry",
)  # fmt: skip


def test_the_run_path_modules_are_small() -> None:
    """The modules of the one run path (strict now)."""
    mods = modules()
    for short in RUN_PATH:
        path = mods[f"sae_cli.{short}"]
        assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, path
        assert long_functions(path) == []
