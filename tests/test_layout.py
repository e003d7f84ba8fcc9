"""The package's shape, checked from the source: imports flow one way (no cycle, module- or function-level),
only the command-line and benchmark front ends import the package root, and scheduler lists exist once."""

import ast
from pathlib import Path

import fastdiff

PKG = Path(fastdiff.__file__).resolve().parent
FRONT_ENDS = {"fastdiff.cli", "fastdiff.bench", "fastdiff.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, modules) -> list[str]:
    """The modules a ``from ... import`` reads: each name that is a submodule, else the module it is taken from
    (``from . import ops`` imports fastdiff.ops; ``from . import sample`` reads the package root)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = [f"{target}.{alias.name}" for alias in node.names]
    return [m if m in modules else target for m in subs]


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    compiled = {"fastdiff._C"}  # the optional CUDA extension: a module, though not a .py file
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                deps.update(_resolve(name, path.name == "__init__.py", node, modules.keys() | compiled))
        # a package importing its own submodules is how a package is built, not a dependency cycle
        graph[name] = {d for d in deps if d in modules and d != name and not d.startswith(name + ".")}
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_front_ends_import_the_package_root():
    offenders = sorted(name for name, deps in import_graph().items() if "fastdiff" in deps and name not in FRONT_ENDS)
    assert not offenders, f"modules importing the package root (import fastdiff / from . import X): {offenders}"


def test_the_loop_layers():
    graph = import_graph()
    assert "fastdiff.loop" in graph["fastdiff.graph"] and "fastdiff.graph" in graph["fastdiff.sampling"]
    assert not graph["fastdiff.loop"] & {"fastdiff.graph", "fastdiff.sampling"}
    assert "fastdiff.sampling" not in graph["fastdiff.graph"]


def test_scheduler_names_are_listed_once():
    """No module keeps its own list of every scheduler: "all schedulers" comes from the registry. A deliberate
    selection (the benchmarks' headline rows) names some of them, and a list of diffusers' names (a
    compatibility group) names classes fastdiff lacks: neither is a copy of the registry."""
    names = set(fastdiff.SCHEDULERS)
    offenders = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                elts = node.elts
                strings = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                scheduler_names = {v for v in strings if v.endswith("Scheduler")}
                if len(names) >= 2 and scheduler_names == names:
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not offenders, f"hand-kept lists of scheduler names: {offenders}"
