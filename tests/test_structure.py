"""The package's structure, read from its source with ``ast`` (nothing is imported, so this takes well under a second).

- No import cycle among module-level imports (``TYPE_CHECKING`` blocks included: a type hint is a dependency too).
  Function-local (deferred) imports are collected separately; a cycle that exists only through them is reported and
  must be listed in ``DEFERRED_CYCLES_ALLOWED`` with the reason it is not a circle of layers.
- No task-name string literal and no isinstance check against a task class outside ``erasus_ray/tasks/`` (issue 23:
  the task adapter declares capabilities; algorithms declare ``requires``). A failure lists the offending sites.

Edges follow import-linter's convention: ``from erasus_ray.a import b`` points at ``erasus_ray.a.b`` when that is a
module, else at ``erasus_ray.a`` (its ``__init__``); the parent packages Python initialises on the way are not edges.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "erasus_ray"
TASKS_PREFIX = "erasus_ray.tasks"


def _registered_task_names() -> frozenset[str]:
    """The names in ``@register_task("...")`` decorators under erasus_ray/tasks/ (read with ast, nothing imported)."""
    names = set()
    for path in sorted((PACKAGE_DIR / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_task" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return frozenset(names)


TASK_NAMES = _registered_task_names()

#: Cycles (as sorted module lists) that exist only through function-local imports and are accepted, with why.
#: Empty: every such cycle found so far was a real circle and was removed.
DEFERRED_CYCLES_ALLOWED: dict[tuple[str, ...], str] = {}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    deferred: bool  # inside a function body: runs at call time, not at import time
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return (PACKAGE_DIR.parent / name.replace(".", "/") / "__init__.py").exists()


def source_path(name: str) -> str:
    """``erasus_ray/a/b.py`` (or ``.../__init__.py``) for module ``erasus_ray.a.b``, as editors and tracebacks show it."""
    stem = name.replace(".", "/")
    return f"{stem}/__init__.py" if _is_package(name) else f"{stem}.py"


def _from_base(name: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module
    package = name if _is_package(name) else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _nearest_module(dotted: str, known: dict[str, ast.Module]) -> str | None:
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _targets(name: str, node: ast.stmt, known: dict[str, ast.Module]) -> list[str]:
    if isinstance(node, ast.Import):
        found = [_nearest_module(alias.name, known) for alias in node.names]
    else:
        base = _from_base(name, node) or ""
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else _nearest_module(base, known) for a in node.names]
    return [t for t in found if t is not None and t != name]


def _walk(node: ast.AST, deferred: bool = False):
    """Every node below ``node`` with whether it sits inside a function body."""
    for child in ast.iter_child_nodes(node):
        inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inner
        yield from _walk(child, inner)


@cache
def import_edges() -> tuple[Edge, ...]:
    known = modules()
    edges = set()
    for name, tree in known.items():
        for node, deferred in _walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(Edge(name, t, deferred, node.lineno) for t in _targets(name, node, known))
    return tuple(sorted(edges, key=lambda e: (e.source, e.target, e.line)))


def cycles(edges: list[Edge]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted tuple."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(cycle: tuple[str, ...], edges: list[Edge]) -> str:
    inside = [e for e in edges if e.source in cycle and e.target in cycle]
    lines = [f"{e.source} -> {e.target} ({source_path(e.source)}:{e.line}{', deferred' if e.deferred else ''})" for e in inside]
    return " <-> ".join(cycle) + "\n    " + "\n    ".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# the graph reader itself
# ----------------------------------------------------------------------------------------------------------------------
def test_graph_sees_module_level_type_checking_and_deferred_imports():
    edges = import_edges()
    by_pair = {(e.source, e.target): e for e in edges}
    assert len(modules()) > 100
    # module level, absolute
    assert by_pair[("erasus_ray.runners.ray_train", "erasus_ray.runners.local")].deferred is False
    # a package re-exporting its submodule
    assert ("erasus_ray.runners", "erasus_ray.runners.local") in by_pair
    # deferred, inside a function
    assert by_pair[("erasus_ray.tuning", "erasus_ray.tuning.sweep")].deferred is True


def test_cycle_finder_finds_a_planted_cycle_and_only_it():
    planted = [Edge("a", "b", False, 1), Edge("b", "c", False, 1), Edge("c", "a", True, 1), Edge("c", "d", False, 1)]
    assert cycles(planted) == [("a", "b", "c")]
    assert cycles([e for e in planted if not e.deferred]) == []


# ----------------------------------------------------------------------------------------------------------------------
# the rules
# ----------------------------------------------------------------------------------------------------------------------
def test_no_import_cycle_among_module_level_imports():
    module_level = [e for e in import_edges() if not e.deferred]
    found = cycles(module_level)
    assert not found, "module-level import cycles:\n" + "\n".join(describe(c, module_level) for c in found)


def test_cycles_through_deferred_imports_are_known_and_justified():
    edges = list(import_edges())
    module_level = set(cycles([e for e in edges if not e.deferred]))
    only_deferred = [c for c in cycles(edges) if c not in module_level]
    unexplained = [c for c in only_deferred if c not in DEFERRED_CYCLES_ALLOWED]
    assert not unexplained, "cycles through function-local imports (a circle of layers hidden by a deferred import; " \
        "move the shared piece down or justify it in DEFERRED_CYCLES_ALLOWED):\n" + \
        "\n".join(describe(c, edges) for c in unexplained)
    stale = [c for c in DEFERRED_CYCLES_ALLOWED if c not in only_deferred]
    assert not stale, f"DEFERRED_CYCLES_ALLOWED lists cycles that no longer exist: {stale}"


def _task_class_names() -> set[str]:
    """Task and every class in ``erasus_ray/tasks/`` deriving from it (by base-class name)."""
    classes = {
        node.name: {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
        for name, tree in modules().items() if name.startswith(TASKS_PREFIX)
        for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
    }
    found = {"Task"}
    while True:
        more = {c for c, bases in classes.items() if bases & found} - found
        if not more:
            return found
        found |= more


def _class_names(node: ast.expr) -> list[str]:
    parts = node.elts if isinstance(node, ast.Tuple) else [node]
    return [p.id if isinstance(p, ast.Name) else p.attr for p in parts if isinstance(p, (ast.Name, ast.Attribute))]


def _leaks_in(tree: ast.AST, path: str, task_classes: set[str]) -> list[str]:
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
            sites.append(f"{path}:{node.lineno} literal {node.value!r}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            hit = sorted(set(_class_names(node.args[1])) & task_classes)
            if hit:
                sites.append(f"{path}:{node.lineno} {node.func.id}(..., {', '.join(hit)})")
    return sites


@cache
def task_leaks() -> tuple[str, ...]:
    """``path:line what`` for each task-name literal or isinstance/issubclass on a task class outside tasks/."""
    task_classes = _task_class_names()
    sites = []
    for name, tree in modules().items():
        if not name.startswith(TASKS_PREFIX):
            sites += _leaks_in(tree, source_path(name), task_classes)
    return tuple(sites)


def test_task_leak_finder_sees_the_known_sites():
    """The finder itself works (so the test below fails for the right reason): the two kinds of site the issue
    named (``_preference.py``'s ``isinstance(ctx.task, CausalLMTask)``, ``tuning/config.py``'s name table), in a
    snippet; and the task classes it knows include the adapters."""
    task_classes = _task_class_names()
    assert {"Task", "CausalLMTask", "ClassificationTask"} <= task_classes
    snippet = ast.parse(
        "def is_lm(ctx):\n    return isinstance(ctx.task, CausalLMTask)\n"
        "TABLE = {'digits': 'classification', 'authors': 'causal_lm'}\n"
        "ok = ctx.task.provides('tokens')\n"
    )
    assert _leaks_in(snippet, "x.py", task_classes) == [
        "x.py:2 isinstance(..., CausalLMTask)", "x.py:3 literal 'classification'", "x.py:3 literal 'causal_lm'"
    ]
    assert not any(s.startswith("erasus_ray/tasks/") for s in task_leaks())


def _task_leak_report() -> str:
    sites = task_leaks()
    return f"{len(sites)} task checks outside erasus_ray/tasks/:\n" + "\n".join(sites)


# The reason carries the list (``pytest -rx -vv`` shows it whole); strict: an XPASS fails, so the mark goes when the
# redesign removes the last site.
def test_task_names_are_read_from_the_registrations():
    assert {"classification", "causal_lm", "denoising", "contrastive", "seq2seq"} <= TASK_NAMES


def test_no_task_name_or_task_class_check_outside_tasks():
    print(_task_leak_report())
    assert not task_leaks(), _task_leak_report()
