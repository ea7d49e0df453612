"""The package's layers only point down, and nothing imports in a cycle (in-function imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fmerge"

# Top to bottom; a module may import modules of its own layer or of layers below it.
LAYERS = [
    ["fmerge.cli", "fmerge.__main__", "fmerge.api"],
    ["fmerge.executor"],
    ["fmerge.steps"],
    ["fmerge.runtime", "fmerge.tasks"],
    ["fmerge.graph"],
    ["fmerge.recipe", "fmerge.sweep", "fmerge.mergekit"],
    ["fmerge.export", "fmerge.merging", "fmerge.store", "fmerge.io", "fmerge.data", "fmerge.fingerprint",
     "fmerge.distributed", "fmerge.progress", "fmerge.report", "fmerge.plots", "fmerge.clip",
     "fmerge.model_card", "fmerge.slices", "fmerge.lora", "fmerge.compat"],
    ["fmerge.methods", "fmerge.fisher", "fmerge.gram", "fmerge.kfac", "fmerge.objective", "fmerge.finetune",
     "fmerge.lm_scoring"],
    ["fmerge.errors", "fmerge"],
]
# Algorithms are pure functions on tensors: besides each other they may import only these.
ALGORITHMS = ("fmerge.methods", "fmerge.fisher", "fmerge.gram", "fmerge.kfac", "fmerge.objective", "fmerge.finetune",
              "fmerge.lm_scoring")
ALGORITHM_MAY_IMPORT = ("fmerge.errors",) + ALGORITHMS


def modules() -> dict[str, Path]:
    found = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = f
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, file in mods.items():
        deps: set[str] = set()
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    best, index = "", None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return index


def test_every_import_points_down_or_sideways():
    wrong = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
             for m, deps in import_graph().items() for d in sorted(deps) if layer_of(d) < layer_of(m)]
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_algorithms_know_nothing_of_recipes_files_or_the_store():
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() if m.startswith(ALGORITHMS)
             for d in deps if not d.startswith(ALGORITHM_MAY_IMPORT) and d != "fmerge"]
    assert not wrong, "\n".join(wrong)


def test_the_store_knows_nothing_of_algorithms():
    deps = import_graph()["fmerge.store"]
    assert not [d for d in deps if d.startswith(ALGORITHMS + ("fmerge.steps", "fmerge.recipe"))], deps


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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


def test_no_import_cycle():
    assert not cycles(import_graph())


def test_the_checks_can_fail():
    """The checkers themselves catch what they are for (a test that cannot fail is a defect)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("fmerge.cli") < layer_of("fmerge.steps.merge") < layer_of("fmerge.methods.ties")
