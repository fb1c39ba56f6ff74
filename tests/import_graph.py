"""The project's import graph, read from the source (nothing is imported): modules, their imports, layers.

Modules are found through the ``package-dir`` mapping in ``pyproject.toml`` (``client/`` is ``m2kt``,
``broker/`` is ``m2kt.broker`` …). An import counts as a dependency on the most specific project module
it names — ``from m2kt.format import reader`` on ``m2kt.format.reader``, ``from m2kt.format import
Packet`` on ``m2kt.format`` — as import-linter counts them. Imports inside functions count (they are
still dependencies); imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layers, bottom to top, by module prefix. ``m2kt`` itself (its ``__init__``) imports nothing at run time.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("m2kt.errors", "m2kt._fields"),
    "format": ("m2kt.format",),
    "sdk": ("m2kt.sdk",),
    "nn": ("m2kt.nn",),
    "teacher": ("m2kt.teacher",),
    "student": ("m2kt.student",),
    "toy": ("m2kt.toy",),
    "demo": ("m2kt.demo",),
    "benchmarks": ("m2kt.benchmarks",),
    "cli": ("m2kt.cli", "m2kt.__main__"),
    "broker": ("m2kt.broker",),
    "migrations": ("m2kt.migrations",),
}

_CHAIN = ["base", "format", "sdk", "nn"]
#: What each layer may import besides itself and the root package: only layers below it. Teacher and
#: student are siblings (neither imports the other); the broker stands apart on the format alone.
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "format": frozenset(_CHAIN[:1]),
    "sdk": frozenset(_CHAIN[:2]),
    "nn": frozenset(_CHAIN[:3]),
    "teacher": frozenset(_CHAIN),
    "student": frozenset(_CHAIN),
    "toy": frozenset([*_CHAIN, "teacher", "student"]),
    "demo": frozenset([*_CHAIN, "teacher", "student", "toy", "broker"]),
    "benchmarks": frozenset([*_CHAIN, "teacher", "student", "toy", "demo", "broker", "migrations"]),
    "cli": frozenset([*_CHAIN, "teacher", "student", "toy", "demo", "benchmarks", "broker", "migrations"]),
    "broker": frozenset(["base", "format"]),
    "migrations": frozenset(["broker"]),
}

FOREIGN_TOP_LEVEL = ("client", "broker", "migrations", "benchmarks", "tests")


def package_dirs() -> dict[str, Path]:
    """``{"m2kt": ROOT/"client", "m2kt.broker": ROOT/"broker", ...}`` from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}


def declared_packages() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def module_files() -> dict[str, Path]:
    """Every project module (``m2kt.format.reader``, packages by their ``__init__``) and its file."""
    dirs = package_dirs()
    mapped = sorted(dirs.values(), key=lambda p: len(p.parts), reverse=True)
    out: dict[str, Path] = {}
    for name, folder in dirs.items():
        for path in folder.rglob("*.py"):
            owner = next(d for d in mapped if path.is_relative_to(d))
            if owner != folder or "__pycache__" in path.parts:
                continue  # belongs to a more specific mapping
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            if any(not (folder.joinpath(*rel[:i]) / "__init__.py").is_file() for i in range(1, len(rel))):
                continue  # not inside a package (e.g. a script folder)
            out[".".join((name, *rel))] = path
    return out


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> project modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level names of other imports

    def layer_of(self, module: str) -> str | None:
        best: tuple[int, str] | None = None
        for layer, prefixes in LAYERS.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), layer)
        return best[1] if best else None

    def reachable(self, start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in self.edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (or a module importing itself)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []
        counter = [0]

        def visit(v: str) -> None:  # Tarjan, iteratively deep enough for this tree
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges.get(v, ())):
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
                if len(component) > 1 or v in self.edges.get(v, ()):
                    found.append(sorted(component))

        for v in sorted(self.modules):
            if v not in index:
                visit(v)
        return found

    def layer_edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {layer: set() for layer in LAYERS}
        for module, targets in self.edges.items():
            src = self.layer_of(module)
            for target in targets:
                dst = self.layer_of(target)
                if src and dst and dst != src:
                    out[src].add(dst)
        return out


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, path: Path) -> Iterator[tuple[str, str | None]]:
    """(imported module, name imported from it or None) for every import that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                yield source, alias.name


def build_graph() -> Graph:
    modules = module_files()
    graph = Graph(modules)
    for module, path in modules.items():
        edges: set[str] = set()
        external: set[str] = set()
        for source, name in _imports(module, path):
            candidates = [f"{source}.{name}", source] if name else [source]
            target = next((c for c in candidates if c in modules), None)
            if target is None:
                parts = source.split(".")
                target = next(
                    (".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None
                )
            if target is not None:
                if target != module:
                    edges.add(target)
            else:
                external.add(source.split(".")[0])
        graph.edges[module] = edges
        graph.external[module] = external
    return graph


def describe(graph: Graph) -> str:
    """The layers as they are: modules and lines per layer, and which layers each one imports."""
    lines_of = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in graph.modules.items()}
    edges = graph.layer_edges()
    rows = []
    for layer in LAYERS:
        members = [m for m in graph.modules if graph.layer_of(m) == layer]
        used = ", ".join(sorted(edges[layer], key=list(LAYERS).index)) or "-"
        rows.append(
            f"{layer:<11} {len(members):>3} modules {sum(lines_of[m] for m in members):>6} lines   imports: {used}"
        )
    return "\n".join(rows)
