"""The layering check: imports point one way, no circles, small files (runs in ``tox -e lint``).

Usage: ``python ci/check_layers.py [ROOT]`` (ROOT: the repository root, by default this file's).

Reads every ``.py`` under ``ROOT/xtp/`` and ``ROOT/accelerators/`` (the folder installed as
``xtp.accelerators``) without importing anything: it needs only the standard library. From each
file's syntax tree it takes every import: absolute, relative, inside functions, and under
``if TYPE_CHECKING:`` too (each is a dependency of meaning). ``from pkg import name`` where
``pkg.name`` is a module counts as importing that module, otherwise as importing ``pkg``.
Imports of anything outside xtp (torch, ...) are ignored. It reports, one line each, and exits 1
if there is any:

* ``import circle: a -> b -> a``: modules that import each other, directly or through others.
  A module importing a package it lies inside (its own package's ``__init__``, for the names
  that package re-exports) is not counted as a circle;
* ``core import: ...``: a module of ``xtp.accelerators`` importing the rest of xtp;
* ``upward import: ...``: a module importing a module of a higher layer (``LAYERS`` below);
* ``unknown layer: ...``: a module or subpackage that ``LAYERS`` does not place;
* ``file too long: ...``: a file over ``LIMIT`` lines.

The last line is ``layers: ok`` or ``layers: N problems``.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

# Layers, lowest first, per package. A module may import modules of its own layer or a lower
# one, never a higher one. An entry is a module or a subpackage (standing for everything under
# it) directly inside the package; the package's own name stands for its ``__init__`` alone.
LAYERS: dict[str, list[list[str]]] = {
    "xtp": [
        # accelerators, communicators, packed weights: never imports the rest of xtp
        ["xtp.accelerators"],
        # the version string, and the typed errors every layer above raises
        ["xtp._version", "xtp.errors"],
        # meta-device model builds and the built-in model configs
        ["xtp.models"],
        # probe a model and derive its ShardPlan: pure, no collectives, no weights
        ["xtp.planning"],
        # TPContext, init_distributed, the ranks-agree barrier
        ["xtp.distributed"],
        # apply a plan: sharded layers, hooks, rng, packing for inference
        ["xtp.sharding"],
        # checkpoint files: safetensors, index, key maps, slice conversions, pre-sharded folders
        ["xtp.formats"],
        # from_pretrained: read each rank's slices into sharded modules, save, preshard/gather
        ["xtp.loading"],
        # losses, seeds, data parallel, training checkpoints over sharded models
        ["xtp.training"],
        # the public face (xtp/__init__.py only): re-exports of the layers below
        ["xtp"],
        # the benchmark machinery behind `xtp bench`: a client of the public face (its rank
        # script imports xtp as a user program does)
        ["xtp.bench"],
        # the command line, one module per command: a client of the public face
        ["xtp.cli"],
    ],
    "xtp.accelerators": [
        # base: typed errors, torch version shims, XTP_* environment, custom-op handles
        [
            "xtp.accelerators.errors",
            "xtp.accelerators._torch_compat",
            "xtp.accelerators.env",
            "xtp.accelerators.op_handles",
        ],
        # communicators: the base, torch, solo, counting, autograd, compiled ops, failures
        ["xtp.accelerators.comm"],
        # packed weights: the device-independent face
        ["xtp.accelerators.packed"],
        # the CPU's own machinery: shared-memory all-reduce, threads, packed linear, GEMV kernel
        ["xtp.accelerators.cpu"],
        # the accelerators themselves (cpu, cuda, xpu, hpu), their registry and selection
        ["xtp.accelerators.devices"],
        # the public face (accelerators/__init__.py only): re-exports
        ["xtp.accelerators"],
    ],
}

# No file over ~400 lines.
LIMIT = 400

# The folders read, by the package name they are installed as.
SOURCES = {"xtp": "xtp", "xtp.accelerators": "accelerators"}

ACCELERATORS = "xtp.accelerators"


def find_modules(root: Path) -> dict[str, Path]:
    """Every module under the source folders: dotted name -> file (a package is its __init__)."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def within(module: str, package: str) -> bool:
    """True when ``module`` is ``package`` or lies inside it."""
    return module == package or module.startswith(package + ".")


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies inside (None: not xtp's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The xtp modules that ``module`` imports, each with the line of its import statement."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.append(submodule if submodule in modules else resolve(source, modules))
        else:
            continue
        found += [(t, node.lineno) for t in targets if t is not None and t != module]
    return found


def place(module: str) -> tuple[list[tuple[int, str]], str | None]:
    """Where LAYERS puts ``module``: its (layer index, entry) in each ordered package, outermost
    first, and None; or, where a package has no entry for it, the name LAYERS lacks."""
    path: list[tuple[int, str]] = []
    package = "xtp"
    while package in LAYERS:
        found = [
            (index, entry)
            for index, entries in enumerate(LAYERS[package])
            for entry in entries
            if module == entry or (entry != package and within(module, entry))
        ]
        if not found:
            return path, ".".join(module.split(".")[: package.count(".") + 2])
        path.append(found[0])
        if found[0][1] == package:  # the package's own __init__
            break
        package = found[0][1]
    return path, None


def upward(source: str, target: str) -> tuple[str, str] | None:
    """The two entries that differ, when ``source`` -> ``target`` climbs to a higher layer."""
    (source_path, source_unknown), (target_path, target_unknown) = place(source), place(target)
    if source_unknown or target_unknown:
        return None  # reported as an unknown layer
    for (source_index, source_entry), (target_index, target_entry) in zip(source_path, target_path):
        if source_entry != target_entry:
            return (source_entry, target_entry) if target_index > source_index else None
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per knot of mutually importing modules (strongly connected, > 1 module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    knots: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            knot = set()
            while True:
                member = stack.pop()
                knot.add(member)
                if member == node:
                    break
            if len(knot) > 1:
                knots.append(knot)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_circle(min(knot), graph, knot) for knot in knots]


def shortest_circle(start: str, graph: dict[str, set[str]], knot: set[str]) -> list[str]:
    """The shortest path from ``start`` back to itself inside ``knot`` (start first and last)."""
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & knot):
            if nxt == start:
                path = [start]
                step: str | None = node
                while step is not None:
                    path.append(step)
                    step = came_from[step]
                return path[::-1]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in a knot but has no way back")


def check(root: Path) -> list[str]:
    """Every problem in the tree at ``root``, one line each."""
    modules = find_modules(root)
    shown = {m: p.relative_to(root).as_posix() for m, p in modules.items()}
    problems: list[str] = []

    unknown = sorted({u for u in (place(m)[1] for m in modules) if u})
    problems += [f"unknown layer: {u}: add it to LAYERS in ci/check_layers.py" for u in unknown]

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = imports_of(module, path, modules)
        # importing a package one lies inside (its re-exported names) makes no circle
        graph[module] = {t for t, _ in edges if not within(module, t)}
        for target, line in sorted(set(edges), key=lambda e: (e[1], e[0])):
            where = f"{shown[module]}:{line}"
            if within(module, ACCELERATORS) and not within(target, ACCELERATORS):
                problems.append(f"core import: {module} imports {target} ({where})")
                continue
            climb = upward(module, target)
            if climb:
                problems.append(
                    f"upward import: {module} imports {target}"
                    f" ({climb[0]} is below {climb[1]}; {where})"
                )

    for circle in circles(graph):
        problems.append("import circle: " + " -> ".join(circle))

    for module, path in modules.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > LIMIT:
            problems.append(f"file too long: {shown[module]} has {lines} lines (limit {LIMIT})")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for problem in problems:
        print(problem)
    print("layers: ok" if not problems else f"layers: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
