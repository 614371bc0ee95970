"""The shape of the package: no import cycle, and every layer imports only the layers below it.

Every ``import`` and ``from ... import`` in every module of imglock is
read with :mod:`ast`, at module level and inside functions and classes
alike.  ``from imglock import errors`` imports the submodule
``imglock.errors``, not the package's ``__init__``; a name that is not a
submodule (``from imglock import __version__``) imports the package.

Imports under ``if TYPE_CHECKING:`` count for the layer rule (a type
names a dependency all the same) but not for cycles (they never run).
Imports made by name at run time (``importlib.import_module``, the lazy
registries of ``imglock/__init__.py`` and ``imglock/formats/__init__.py``)
are not read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

import imglock

PACKAGE_DIR: Final = Path(__file__).resolve().parents[2] / "imglock"

#: The layers, lowest first: (layer, the modules in it, by name or name prefix).
#: A module belongs to the layer of the longest prefix that names it.
LAYERS: Final = (
    ("base", ("imglock.errors", "imglock.faults", "imglock.text", "imglock.safeio")),
    ("lock", ("imglock.lock",)),
    ("formats", ("imglock.formats", "imglock.chain")),
    ("qemu", ("imglock.qemu",)),
    (
        "library",
        (
            "imglock",
            "imglock.api",
            "imglock.claims",
            "imglock.report",
            "imglock.scan",
            "imglock.lockcheck",
        ),
    ),
    ("run", ("imglock.run",)),
    ("cli", ("imglock.cli", "imglock.__main__")),
)

#: Which layers each layer may import.  The order is that of LAYERS, except
#: that qemu (QEMU's command lines and monitor, for the wrapper alone) needs
#: neither formats nor chains, and the library never needs qemu.
MAY_IMPORT: Final = {
    "base": {"base"},
    "lock": {"base", "lock"},
    "formats": {"base", "lock", "formats"},
    "qemu": {"base", "lock", "qemu"},
    "library": {"base", "lock", "formats", "library"},
    "run": {"base", "lock", "formats", "qemu", "library", "run"},
    "cli": {"base", "lock", "formats", "qemu", "library", "run", "cli"},
}


@dataclass(frozen=True)
class Import:
    """One import statement's dependency of one module on another."""

    importer: str
    imported: str
    path: Path
    line: int
    statement: str
    type_checking: bool

    def __str__(self) -> str:
        where = self.path.relative_to(PACKAGE_DIR.parent)
        return f"{where}:{self.line}: {self.statement} ({self.importer} -> {self.imported})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Final = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def layer_of(name: str) -> str:
    """The layer of module *name*: that of the longest prefix naming it."""
    best = ("", "")
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (layer, prefix)
    assert best[0], f"{name} is in no layer: add it to LAYERS"
    return best[0]


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ImportReader(ast.NodeVisitor):
    """Every import of one module, with whether it runs only under TYPE_CHECKING."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.found: list[Import] = []
        self.type_checking = False

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        outer, self.type_checking = self.type_checking, True
        for statement in node.body:
            self.visit(statement)
        self.type_checking = outer
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.name if is_package(self.name) else self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(node, submodule if submodule in MODULES else base)

    def _add(self, node: ast.stmt, imported: str) -> None:
        if imported != "imglock" and not imported.startswith("imglock."):
            return
        statement = ast.get_source_segment(self.path.read_text(encoding="utf-8"), node) or ""
        self.found.append(
            Import(
                self.name,
                imported,
                self.path,
                node.lineno,
                " ".join(statement.split()),
                self.type_checking,
            )
        )


def all_imports() -> list[Import]:
    found = []
    for name, path in MODULES.items():
        reader = _ImportReader(name, path)
        reader.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found += reader.found
    return found


IMPORTS: Final = all_imports()


def strongly_connected(edges: dict[str, list[Import]]) -> Iterator[list[str]]:
    """Tarjan's strongly connected components of the module graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[list[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in edges.get(node, []):
            if edge.imported not in index:
                yield from visit(edge.imported)
                low[node] = min(low[node], low[edge.imported])
            elif edge.imported in on_stack:
                low[node] = min(low[node], index[edge.imported])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            yield sorted(component)

    for node in sorted(edges):
        if node not in index:
            yield from visit(node)


def a_cycle(component: list[str], edges: dict[str, list[Import]]) -> list[Import]:
    """One cycle through the component's first module, as the imports that make it."""
    members = set(component)
    start = component[0]
    # Breadth-first from start back to start, within the component.
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for edge in edges.get(node, []):
            if edge.imported not in members:
                continue
            if edge.imported == start:
                return [*paths[node], edge]
            if edge.imported not in paths:
                paths[edge.imported] = [*paths[node], edge]
                queue.append(edge.imported)
    raise AssertionError(f"no cycle through {start}")


def test_every_module_is_in_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


def test_no_import_cycle() -> None:
    edges: dict[str, list[Import]] = {}
    for found in IMPORTS:
        if not found.type_checking:
            edges.setdefault(found.importer, []).append(found)
    cycles = []
    for component in strongly_connected(edges):
        self_import = [e for e in edges.get(component[0], []) if e.imported == component[0]]
        if len(component) > 1 or self_import:
            steps = a_cycle(component, edges)
            cycles.append(
                f"cycle among {', '.join(component)}:\n" + "\n".join(f"    {s}" for s in steps)
            )
    if cycles:
        pytest.fail("import cycles:\n" + "\n".join(cycles), pytrace=False)


def test_no_upward_import() -> None:
    upward = [
        f"{found} imports layer {layer_of(found.imported)!r} from layer "
        f"{layer_of(found.importer)!r}" + (" (under TYPE_CHECKING)" if found.type_checking else "")
        for found in IMPORTS
        if layer_of(found.imported) not in MAY_IMPORT[layer_of(found.importer)]
    ]
    if upward:
        pytest.fail("imports against the layer order:\n" + "\n".join(upward), pytrace=False)


def test_the_reader_resolves_submodules_and_type_checking() -> None:
    """The reader itself: what it makes of the forms of import it meets."""
    imports = {(i.importer, i.imported, i.type_checking) for i in IMPORTS}
    # `from imglock import faults` is an import of imglock.faults.
    assert ("imglock.cli", "imglock", False) in imports  # from imglock import __version__
    assert ("imglock.cli", "imglock.faults", False) in imports  # from imglock import faults
    assert any(imported == "imglock.faults" for _i, imported, _t in imports)


def test_no_module_shadows_a_name_of_the_package() -> None:
    """A submodule named like a public name (``imglock.claim``) would replace it once imported."""
    submodules = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert submodules.isdisjoint(imglock.__all__), submodules & set(imglock.__all__)


def defines_a_named_tuple(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ClassDef)
        and any(isinstance(base, ast.Name) and base.id == "NamedTuple" for base in node.bases)
        for node in ast.walk(tree)
    )


def postpones_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def test_a_module_that_defines_records_as_named_tuples_evaluates_their_annotations() -> None:
    """typing.NamedTuple compiles each string annotation of its fields: those are not strings."""
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}
    postponing = sorted(
        name
        for name, tree in trees.items()
        if defines_a_named_tuple(tree) and postpones_annotations(tree)
    )
    assert postponing == [], "drop `from __future__ import annotations` (README, Architecture)"
    assert defines_a_named_tuple(trees["imglock.lock.holder"])  # the reader sees records
    assert postpones_annotations(trees["imglock.api"])  # ... and the import
