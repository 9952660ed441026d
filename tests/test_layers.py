"""The layers run one way, read from the source: every import of the project's packages, at module level
or inside a function (and importlib.import_module with a literal name), obeys

    deepreduce  <  secure  <  server, client      (server and client never import each other)

and no module of the project imports itself back through others (no cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"deepreduce": 0, "secure": 1, "server": 2, "client": 2}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement or import_module("...") call in `path` may load."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.add(node.args[0].value)
    return {name for name in found if name.split(".")[0] in RANK}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for top in RANK for p in (ROOT / top).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for name in imported_names(path):
            while name and name not in files:  # `from pkg import name`: the module pkg.name, else pkg
                name = name.rpartition(".")[0]
            # a package's __init__ importing its own submodules is how a package is built, not a cycle
            if name and name != mod and not (path.name == "__init__.py" and name.startswith(mod + ".")):
                targets.add(name)
        graph[mod] = targets
    return graph


def test_imports_run_one_way():
    wrong = []
    for mod, targets in import_graph().items():
        for target in targets:
            low, high = mod.split(".")[0], target.split(".")[0]
            if RANK[high] > RANK[low] or (RANK[high] == RANK[low] == 2 and high != low):
                wrong.append(f"{mod} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(mod: str, path: list[str]) -> None:  # depth-first; a grey node met again closes a cycle
        state[mod] = "grey"
        for target in sorted(graph[mod]):
            if state.get(target) == "grey":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[mod] = "black"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def test_the_checker_sees_imports_inside_functions():
    """The rule holds for lazy imports too: the parser must find one (a known lazy import in the tree)."""
    assert "secure.core.engine" in imported_names(ROOT / "secure" / "core" / "runtime.py")  # inside _fast()


def test_secure_subpackages_say_what_they_own():
    for package in ("core", "reference", "control", "tools"):
        doc = ast.get_docstring(ast.parse((ROOT / "secure" / package / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, package
