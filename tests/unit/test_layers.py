"""The package's layering rules, checked on the source: diffusion/ is pure tensor math; entry points share
``utils`` instead of importing each other; callbacks and entry points ask the model, not its network; recipes are
built from components, not from configs or checkpoint files; no import cycles."""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "diffusion_lightning"
ENTRY_POINTS = ["train", "sample", "evaluate", "report", "bench"]


class ImportStatement(NamedTuple):
    module: str  # the absolute module named (``from .x import y`` in package p: p.x)
    names: tuple[str, ...]  # what ``from module import ...`` takes from it; () for ``import module``
    line: int
    lazy: bool  # inside a function: runs when the function is called, not when the module is imported
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs


def import_statements(path: Path, package: Path = PACKAGE) -> Iterator[ImportStatement]:
    """Every import statement of a file, relative imports resolved against ``package``."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> Iterator[ImportStatement]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield ImportStatement(alias.name, (), node.lineno, lazy, type_checking)
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            yield ImportStatement(module, tuple(a.name for a in node.names), node.lineno, lazy, type_checking)
        lazy = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                yield from visit(child, lazy, True)
            for child in node.orelse:
                yield from visit(child, lazy, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, lazy, type_checking)

    yield from visit(ast.parse(path.read_text()), False, False)


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against the package); a
    ``from m import n`` gives m and m.n (n may be a module or a name in m)."""
    names = set()
    for statement in import_statements(path, package):
        names.add(statement.module)
        names |= {f"{statement.module}.{name}" for name in statement.names}
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "diffusion").glob("*.py")), ids=lambda p: p.name)
def test_diffusion_imports_no_lightning_nor_hydra(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra",
                                                                     "omegaconf")}  # fmt: skip
    bad |= {m for m in imported_modules(path) if m.startswith("diffusion_lightning.") and not
            m.startswith("diffusion_lightning.diffusion")}  # fmt: skip
    assert not bad, f"{path.name} imports {sorted(bad)}"


def entry_files(entry: str) -> list[Path]:
    """An entry point's module, or every module of an entry-point package (the benchmark)."""
    path = PACKAGE / f"{entry}.py"
    return [path] if path.is_file() else sorted((PACKAGE / entry).glob("*.py"))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_do_not_import_each_other(entry):
    others = {f"diffusion_lightning.{e}" for e in ENTRY_POINTS if e != entry}
    for path in entry_files(entry):
        bad = {m for m in imported_modules(path) for o in others if m == o or m.startswith(f"{o}.")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "path", [*sorted((PACKAGE / "callbacks").glob("*.py")), PACKAGE / "sample.py", PACKAGE / "evaluate.py"],
    ids=lambda p: p.name,
)
def test_callbacks_and_entry_points_ask_the_model_not_its_network(path):
    """No ``<module>.net.`` (image size, classes, channels) and no ``.diffusion`` table outside the model."""
    source = path.read_text()
    assert not re.findall(r"\.net\.\w+|\.diffusion\.\w+", source), path.name


# ---------------------------------------------------------------------------------------------- issue 29
RECIPE_MODULES = sorted(p for p in (PACKAGE / "models").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", RECIPE_MODULES, ids=lambda p: p.name)
def test_recipes_import_neither_hydra_nor_the_checkpoint_loader(path):
    """A recipe is built from components (a network, a first stage, a teacher module); turning configs and checkpoint
    files into them is the entry points' and :mod:`diffusion_lightning.checkpoint`'s work. Function-level imports
    count."""
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("hydra", "omegaconf")
           or m == "diffusion_lightning.checkpoint" or m.startswith("diffusion_lightning.checkpoint.")}  # fmt: skip
    assert not bad, f"models/{path.name} imports {sorted(bad)}"


# The entry points' own code: the entry points, the modules train.py was split into and the benchmark package.
ENTRY_CODE = ["train", "sample", "evaluate", "report", "prior_stages", "run_folder", "launcher", "utils/__init__",
              *(f"bench/{p.stem}" for p in sorted((PACKAGE / "bench").glob("*.py")))]  # fmt: skip


@pytest.mark.parametrize("entry", ENTRY_CODE)
def test_entry_points_do_not_import_nets_or_diffusion_internals(entry):
    """Entry points reach networks and diffusion math through the model (``sample``, ``image_shape``, ...)."""
    imported = imported_modules(PACKAGE / f"{entry}.py")
    bad = {m for m in imported if any(m == p or m.startswith(f"{p}.") for p in
                                       ("diffusion_lightning.nets", "diffusion_lightning.diffusion"))}  # fmt: skip
    assert not bad, f"{entry}.py imports {sorted(bad)}"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` by its absolute name (a package by its name: its ``__init__.py``)."""
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, ImportStatement]]:
    """importer -> {imported module of the package: the statement}, for the imports that run (``TYPE_CHECKING``
    blocks never do). ``from p import n`` imports p and, where n is a module, p.n; importing a module first imports
    its packages (their ``__init__``), except the importer's own, which are always imported before it (so ``from .
    import sibling`` in a package's module does not import that package again). A module-level statement is kept
    over a lazy one for the same target."""
    files = module_files(package)
    graph: dict[str, dict[str, ImportStatement]] = {}
    for importer, path in files.items():
        own, edges = _ancestors(importer) | {importer}, {}
        for statement in import_statements(path, package):
            if statement.type_checking:
                continue
            submodules = {f"{statement.module}.{n}" for n in statement.names} & files.keys()
            only_submodules_of_own = statement.module in own and len(submodules) == len(statement.names) > 0
            targets = submodules | (set() if only_submodules_of_own else {statement.module})
            targets |= {a for t in targets for a in _ancestors(t)}
            for target in (targets & files.keys()) - own:
                if target not in edges or (edges[target].lazy and not statement.lazy):
                    edges[target] = statement
        graph[importer] = edges
    return graph


# (importer, imported): a function-level import that is needed to break an import cycle, and why. None is: keep it
# that way, or name the import here, so that the exception is visible instead of this test being weakened.
LAZY_CYCLE_IMPORTS: dict[tuple[str, str], str] = {}


def import_cycles(graph: dict[str, dict[str, ImportStatement]], scope: set[str]) -> list[tuple[list[str], set[str]]]:
    """Per strongly connected component of ``graph`` that holds a module of ``scope`` (Tarjan's algorithm): a shortest
    cycle through its first such module (a list of modules, the first repeated at the end) and the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while (w := stack.pop()) != v:
                component.add(w)
            components.append(component | {v})

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        if len(component) < 2 or not component & scope:
            continue
        start = min(component & scope)
        paths, queue = {start: [start]}, [start]
        while queue:  # breadth-first within the component, back to start
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    queue = []
                    cycles.append(([*paths[v], start], component))
                    break
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, ImportStatement]]) -> str:
    steps = []
    for a, b in itertools.pairwise(cycle):
        statement = graph[a][b]
        steps.append(f"{a} -> {b} (line {statement.line}{', in a function' if statement.lazy else ''})")
    return "; ".join(steps)


def cycles_in_scope(package: Path = PACKAGE, everywhere: bool = False) -> list[str]:
    """The import cycles through a module under models/, diffusion/ or nets/ or an entry point (a cycle may pass
    through any other module of the package on the way), or with ``everywhere`` through any module, with
    :data:`LAZY_CYCLE_IMPORTS` left out."""
    graph = import_graph(package)
    for (importer, imported), why in LAZY_CYCLE_IMPORTS.items():
        statement = graph.get(importer, {}).get(imported)
        assert statement is not None and statement.lazy, (
            f"LAZY_CYCLE_IMPORTS names no lazy import {importer} -> {imported} ({why}): remove the entry"
        )
        del graph[importer][imported]
    name = package.name
    scope = {m for m in graph if m.split(".")[1:2] in (["models"], ["diffusion"], ["nets"])}
    scope |= {f"{name}.{entry}" for entry in ("train", "sample", "evaluate", "report")} & graph.keys()
    if everywhere:
        scope = set(graph)
    found = []
    for cycle, component in import_cycles(graph, scope):
        more = len(component) > len(cycle) - 1
        found.append(describe_cycle(cycle, graph) + (f" [on cycles with it: {', '.join(sorted(component))}]" * more))
    return found


def test_no_import_cycle_among_models_diffusion_nets_and_entry_points():
    """Function-level imports count: a lazy import that closes a cycle only defers the failure to a call."""
    cycles = cycles_in_scope()
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_import_cycle_anywhere_in_the_package():
    """The benchmark, its diffusers side and the export included (they share :mod:`diffusion_lightning.interop`)."""
    cycles = cycles_in_scope(everywhere=True)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_finds_cycles_through_lazy_imports_and_package_inits(tmp_path):
    pkg = tmp_path / "pkg"
    for folder in ("models", "diffusion", "other"):
        (pkg / folder).mkdir(parents=True)
    files = {
        "__init__.py": "",
        "models/__init__.py": "from .a import A\n",
        "models/a.py": "from ..diffusion.b import B\n",  # imports diffusion/__init__ first
        "diffusion/__init__.py": "from .c import C\n",
        "diffusion/b.py": "",
        "diffusion/c.py": "def f():\n    from pkg.other.d import D\n",  # lazy
        "other/__init__.py": "",
        "other/d.py": "from .. import models\n",  # through a module out of scope
        "diffusion/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import F\n",
        "diffusion/f.py": "from . import e\n",  # a cycle only for type checkers: none
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    (cycle,) = cycles_in_scope(pkg)
    assert "pkg.diffusion.c -> pkg.other.d (line 2, in a function)" in cycle
    assert "pkg.models.a -> pkg.diffusion (line 1)" in cycle
