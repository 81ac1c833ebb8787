"""The shape of the code: no import circles, short functions, a CLI whose help does not load torch.

Read statically (``ast``), so a lazy import inside a function counts as an import: a module
that imports another lazily to dodge a circle still has the circle. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("safa", "safa_kernels")
MAX_FUNCTION_LINES = 120


def _modules() -> Dict[str, str]:
    """Dotted module name -> file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.AST]:
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.AST, known: Set[str]) -> Set[str]:
    """The modules of the packages that ``node`` (in ``module``) imports."""
    targets: Set[str] = set()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import name`: name may be a submodule or an attribute of pkg.
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        edges: Set[str] = set()
        for node in _imports(tree):
            edges |= _resolve(module, is_package, node, known)
        # A package's __init__ importing its own submodules is how packages are built, and a
        # submodule importing its parent package's name is resolved to the parent: ignore both
        # directions between a module and the packages that contain it.
        graph[module] = {t for t in edges if t != module and not module.startswith(t + ".")
                         and not t.startswith(module + ".")}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_reader_finds_a_circle_and_lazy_imports():
    # The checker itself: a lazy import closing a circle is found; TYPE_CHECKING is not an import.
    tree = ast.parse("import x\ndef f():\n    from . import y\nif TYPE_CHECKING:\n    import z\n")
    names = [n.names[0].name for n in _imports(tree)]
    assert sorted(names) == ["x", "y"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _long_functions() -> List[Tuple[str, int]]:
    found = []
    for module, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append((f"{module}.{node.name}", length))
    return found


def test_no_function_is_longer_than_a_screen_or_two():
    too_long = _long_functions()
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + \
        ", ".join(f"{name} ({n})" for name, n in too_long)


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["evaluate", "--help"], ["profile", "--help"]])
def test_cli_help_does_not_import_torch(argv):
    # As torchao's lean-import test: help is text, and loading torch costs seconds.
    code = ("import sys\nfrom safa.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)" % argv)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "usage:" in run.stdout
    assert run.stderr.strip().splitlines()[-1] == "torch not imported", run.stderr[-2000:]
