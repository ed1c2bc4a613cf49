"""Every module imports, and the package has no import cycle (lazy imports inside functions
count too) and keeps its layers: models never import tasks, data or training code."""
import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "rsvl_jax"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The rsvl_jax modules `name` imports anywhere in its file (resolved to modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` runs pkg's __init__ too: an edge to both.
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle():
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    GRAPH["rsvl_jax.config"].add("rsvl_jax.tasks")  # tasks imports config: now a cycle
    try:
        assert _cycle() is not None
    finally:
        GRAPH["rsvl_jax.config"].discard("rsvl_jax.tasks")


@pytest.mark.parametrize("layer, forbidden", [
    ("rsvl_jax.models", ("rsvl_jax.tasks", "rsvl_jax.data", "rsvl_jax.train", "rsvl_jax.evaluate",
                         "rsvl_jax.checkpoint", "rsvl_jax.convert")),
    ("rsvl_jax.tasks", ("rsvl_jax.train", "rsvl_jax.evaluate")),
    ("rsvl_jax.data", ("rsvl_jax.tasks", "rsvl_jax.train", "rsvl_jax.evaluate")),
])
def test_layers(layer, forbidden):
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if m == layer or m.startswith(layer + ".")
                 for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith("__main__")))
def test_every_module_imports(name):
    importlib.import_module(name)
