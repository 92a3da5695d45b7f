"""The package structure in numbers, for a checkout: modules per folder, the depth of the module-level import graph
(its floors), imports that climb back to a package's `__init__`, import cycles, and the length of named functions.

    python scripts/structure.py [ROOT] [--function FILE:NAME ...] [--module pipeline.config ...]

Only imports at module level count (those inside functions run when a command does, not when a module loads), and
only imports of kdpipe's own modules (`pipeline`, `cache`). Run it on two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGES = ("pipeline", "cache")


def modules(root: Path) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its `__init__.py`)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kdpipe modules `name` imports at module level (a `from x import y` of a submodule counts as that one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 1 for one that imports no kdpipe module, else one above the highest it imports (a cycle
    shares one floor)."""
    component = {m: m for m in graph}
    for members in cycles(graph):
        for m in members:
            component[m] = members[0]
    memo: dict[str, int] = {}

    def floor(m: str, seen: frozenset) -> int:
        c = component[m]
        if c not in memo:
            members = [n for n in graph if component[n] == c]
            below = {component[t] for n in members for t in graph[n]} - {c} - seen
            memo[c] = 1 + max((floor(t, seen | {c}) for t in below), default=0)
        return memo[c]

    return {m: floor(m, frozenset()) for m in graph}


def climbs(graph: dict[str, set[str]], found: dict[str, Path]) -> list[tuple[str, str]]:
    """Imports of a package's `__init__` from a module inside that package: climbing back up."""
    packages = {m for m, p in found.items() if p.name == "__init__.py"}
    return sorted((m, t) for m, targets in graph.items() for t in targets if t in packages and m.startswith(t + "."))


def function_lines(root: Path, spec: str) -> int:
    file, _, name = spec.partition(":")
    for node in ast.walk(ast.parse((root / file).read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise SystemExit(f"no function {name} in {file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=".", type=Path)
    parser.add_argument("--function", action="append", default=[], help="FILE:NAME whose length to report")
    parser.add_argument("--module", action="append", default=[], help="a module whose floor and imports to report")
    args = parser.parse_args()
    found = modules(args.root)
    graph = {m: imports(m, p, set(found)) for m, p in found.items()}
    folders = Counter(str(p.parent.relative_to(args.root)) for p in found.values() if p.name != "__init__.py")
    levels = floors(graph)
    print("modules per folder: " + ", ".join(f"{f}/ {n}" for f, n in sorted(folders.items())))
    print(f"import floors: {max(levels.values())}")
    top = max(levels.values())
    print(f"  top floor: {', '.join(sorted(m for m, f in levels.items() if f == top))}")
    back = climbs(graph, found)
    print(f"imports climbing back to a package __init__: {len(back)}" + "".join(f"\n  {m} -> {t}" for m, t in back))
    loops = cycles(graph)
    print(f"import cycles: {len(loops)}" + "".join(f"\n  {' <-> '.join(c)}" for c in loops))
    for name in args.module:
        print(f"{name}: floor {levels[name]}, imports {', '.join(sorted(graph[name])) or 'no kdpipe module'}")
    for spec in args.function:
        print(f"{spec}: {function_lines(args.root, spec)} lines")


if __name__ == "__main__":
    sys.exit(main())
