"""The package's layout: no import cycle inside ``backdoor_sae`` (every import counted, lazy ones included), no
module over 400 lines, and subpackage ``__init__`` files that import nothing (the public API is the root's)."""

from __future__ import annotations

import ast
from pathlib import Path

import backdoor_sae

ROOT = Path(backdoor_sae.__file__).parent
MAX_LINES = 400


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package directory ``root``."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Edges module -> module of the package for every ``import`` / ``from ... import`` anywhere in a file
    (function bodies and ``TYPE_CHECKING`` blocks included), plus each module's implicit import of its parent
    subpackages (the root package, whose ``__init__`` only re-exports lazily, excepted)."""
    mods = module_names(root)
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                # importing a.b.c runs a.b's __init__ too (not the root's: it imports nothing eagerly)
                for i in range(2, len(parts) + 1):
                    dotted = ".".join(parts[:i])
                    if dotted in mods and dotted != name and dotted != top:
                        graph[name].add(dotted)
        parent = name.rsplit(".", 1)[0] if "." in name else None
        while parent and parent != top:
            graph[name].add(parent)
            parent = parent.rsplit(".", 1)[0] if "." in parent else None
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_cycle_finder_sees_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")  # a lazy import closes the cycle
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("def f():\n    pass\n")
    assert cycles(import_graph(pkg)) == []
    (pkg / "sub" / "__init__.py").write_text("from pkg.c import x\n")  # via the subpackage's __init__
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.c", "pkg.sub", "pkg.sub.b"]]


def test_modules_are_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_subpackage_inits_import_nothing():
    for init in ROOT.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], init
