"""The package layering of llama/ and moa/, read from the source with `ast` (nothing is imported).

Every module belongs to one layer of `LAYERS` and may import only from its own layer and the layers
below it: imports inside functions count, relative imports are resolved, and `from moa import NAME`
counts as an import of the module NAME comes from (`moa._PUBLIC`, imported lazily). Every import of
llama/ or moa/ must name a module of the tree (a module moved without its importers is caught here).
The import graph between modules has no cycle. `moa.eval` (scoring) imports no torch.
Command lines, scripts/, benchmarks/ and tests/ sit above every layer and are not checked.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama", "moa")

# The layers, bottom to top: a module may import from its own layer and the layers below it.
# docs/architecture.md describes the same order; this list is where it is written down.
LAYERS = [
    "llama",       # the base model: nothing of moa
    "moa",         # moa's root modules (moa/*.py: checks, cli, atomic; __init__ imports lazily)
    "moa.method",  # the paper's method
    "moa.files",   # adapter files, locks, settings sidecars
    "moa.lora",    # LoRA algebra, PEFT folders
    "moa.train",
    "moa.infer",   # generation and the held-out loss
    "moa.eval",    # scoring: pure Python, no torch
    "moa.tasks",   # many task adapters on one model
]


@dataclass(frozen=True)
class Module:
    name: str  # dotted: moa.files.adapters; a package is its __init__: moa.files
    path: Path
    is_package: bool
    shown: str  # the path from the checkout's root: moa/files/adapters.py


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module imported, resolved (`from a.b import c`: a.b.c when that is a module, else a.b)


def tree_modules(root: Path = ROOT) -> dict[str, Module]:
    """Every module of llama/ and moa/, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = Module(".".join(parts), path, is_package, path.relative_to(root).as_posix())
    return found


def public_names(root: Path = ROOT) -> dict[str, str]:
    """moa's lazily imported public names -> their modules (the `_PUBLIC` dict of moa/__init__.py)."""
    tree = ast.parse((root / "moa" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_PUBLIC" for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    return {}


def imports_of(source: str, name: str, is_package: bool, known: set[str], public: dict[str, str],
               filename: str = "<source>") -> list[Import]:
    """The imports of llama/ and moa/ modules in `source` (module `name`), anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts) - 1:
                    raise ValueError(f"{filename}:{node.lineno}: relative import beyond the top package")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                if module == "moa" and alias.name in public:
                    found.append(Import(node.lineno, public[alias.name]))
                elif f"{module}.{alias.name}" in known:
                    found.append(Import(node.lineno, f"{module}.{alias.name}"))
                else:
                    found.append(Import(node.lineno, module))
    return [i for i in found if i.target.split(".")[0] in PACKAGES]


def layer_of(name: str, root: Path = ROOT) -> Optional[int]:
    """The index in `LAYERS` of a module of llama/ or moa/ (None: in no layer). The `moa` layer holds
    moa itself and the modules directly in moa/; a subpackage of moa needs its own entry."""
    best = None
    for i, layer in enumerate(LAYERS):
        if (name == layer or name.startswith(layer + ".")) and (best is None or len(layer) > len(LAYERS[best])):
            best = i
    if best is not None and LAYERS[best] == "moa":
        parts = name.split(".")
        if len(parts) > 2 or (len(parts) == 2 and (root / "moa" / parts[1]).is_dir()):
            return None
    return best


def module_imports(root: Path = ROOT) -> dict[str, tuple[Module, list[Import]]]:
    modules = tree_modules(root)
    known, public = set(modules), public_names(root)
    return {name: (m, imports_of(m.path.read_text(encoding="utf-8"), name, m.is_package, known, public,
                                 filename=m.shown))
            for name, m in modules.items()}


def upward_imports(graph: dict[str, tuple[Module, list[Import]]], root: Path = ROOT) -> list[str]:
    """'file:line: layer A imports B of the higher layer C' for every import of a higher layer."""
    wrong = []
    for name, (module, imports) in sorted(graph.items()):
        own = layer_of(name, root)
        for imp in imports:
            other = layer_of(imp.target, root)
            if own is not None and other is not None and other > own:
                wrong.append(f"{module.shown}:{imp.line}: {name} (layer {LAYERS[own]}) imports {imp.target} "
                             f"of the higher layer {LAYERS[other]}")
    return wrong


def import_cycles(graph: dict[str, tuple[Module, list[Import]]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of
    modules that import each other, directly or through others."""
    edges = {name: sorted({i.target for i in imports if i.target in graph and i.target != name})
             for name, (_, imports) in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for group in groups:  # a shortest way back from the group's first module to itself
        members, start = set(group), group[0]
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for v in frontier:
                for w in edges[v]:
                    if w in members and w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        path, v = [start], previous[start]
        while v != start:
            path.append(v)
            v = previous[v]
        cycles.append([start] + path[:0:-1] + [start])
    return cycles


def _where(graph: dict[str, tuple[Module, list[Import]]], a: str, b: str) -> str:
    module, imports = graph[a]
    lines = sorted({i.line for i in imports if i.target == b})
    return f"{module.shown}:{','.join(map(str, lines))}"


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[Module, list[Import]]]:
    return module_imports()


def test_every_module_is_in_a_layer(graph):
    outside = [f"{m.shown} ({name})" for name, (m, _) in sorted(graph.items()) if layer_of(name) is None]
    assert not outside, f"modules in no layer of LAYERS (tests/test_layering.py): {outside}"


def test_imports_name_modules_of_the_tree(graph):
    missing = [f"{m.shown}:{i.line}: imports {i.target}, which is no module of llama/ or moa/"
               for _, (m, imports) in sorted(graph.items()) for i in imports if i.target not in graph]
    assert not missing, "\n".join(missing)


def test_no_module_imports_a_higher_layer(graph):
    wrong = upward_imports(graph)
    assert not wrong, "imports of a higher layer (order: " + " < ".join(LAYERS) + "):\n" + "\n".join(wrong)


def test_module_import_graph_has_no_cycle(graph):
    cycles = import_cycles(graph)
    shown = [" -> ".join(c) + "  (" + "; ".join(_where(graph, a, b) for a, b in zip(c, c[1:])) + ")"
             for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_moa_eval_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", "import moa.eval, moa.eval.scoring, moa.eval.rules, "
                           "moa.eval.intervals, sys; assert 'torch' not in sys.modules, 'torch imported'"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- the checker itself, on a small tree -----------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_finds_upward_relative_public_and_cyclic_imports(tmp_path):
    _write(tmp_path, {
        "llama/__init__.py": "",
        "llama/model.py": "def f():\n    from moa.checks import check_int\n",  # inside a function: counts
        "moa/__init__.py": '_PUBLIC = {"TaskRoutedModel": "moa.tasks.serving"}\n',
        "moa/checks.py": "",
        "moa/method/__init__.py": "",
        "moa/method/config.py": "from ..files import adapters\nfrom . import state\n",  # relative, upward
        "moa/method/state.py": "from moa import TaskRoutedModel\nimport moa.method.config\n",  # public name; a cycle
        "moa/files/__init__.py": "",
        "moa/files/adapters.py": "from moa.method.config import X\n",
        "moa/tasks/__init__.py": "",
        "moa/tasks/serving.py": "",
    })
    graph = module_imports(tmp_path)
    assert [i.target for i in graph["moa.method.config"][1]] == ["moa.files.adapters", "moa.method.state"]
    assert [i.target for i in graph["moa.method.state"][1]] == ["moa.tasks.serving", "moa.method.config"]
    wrong = upward_imports(graph, tmp_path)
    assert wrong == [
        "llama/model.py:2: llama.model (layer llama) imports moa.checks of the higher layer moa",
        "moa/method/config.py:1: moa.method.config (layer moa.method) imports moa.files.adapters of the higher "
        "layer moa.files",
        "moa/method/state.py:1: moa.method.state (layer moa.method) imports moa.tasks.serving of the higher "
        "layer moa.tasks",
    ]
    cycles = import_cycles(graph)
    assert cycles == [["moa.files.adapters", "moa.method.config", "moa.files.adapters"]]  # a shortest one
    _write(tmp_path, {"moa/extra/__init__.py": ""})
    assert layer_of("moa.extra", tmp_path) is None and layer_of("moa.checks", tmp_path) == 1
