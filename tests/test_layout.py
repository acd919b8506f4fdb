"""The package's shape: one-way imports (no cycle, function-level imports included), no module
over 400 lines, the public verbs are functions, and the paths removed in 0.3 are gone."""

import ast
import importlib
from pathlib import Path

import pytest

import lrdaccel as lrd

PACKAGE = Path(lrd.__file__).parent
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every lrdaccel module `path` imports anywhere (top level, in functions, in classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # importing a submodule runs its package's __init__ first, but a package's own
            # submodules importing their __init__ is no cycle of ours
            if target in known and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_anywhere():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles_in_function_level_imports(tmp_path):
    """The check above could pass by reading nothing: run it on a package with a cycle that only a
    function-level import closes."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set(), "p.d": set()}
    assert find_cycles(graph) == []
    graph["p.c"].add("p.a")
    assert find_cycles(graph) == [["p.a", "p.b", "p.c"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lrdaccel.planning import plan\n")
    assert _imports(source, "lrdaccel.x", {"lrdaccel.planning"}) == {"lrdaccel.planning"}


def test_planning_never_imports_the_stages_that_apply_it():
    graph = import_graph()
    later = ("lrdaccel.decomposition", "lrdaccel.rankopt", "lrdaccel.training", "lrdaccel.bench", "lrdaccel.cli")
    for name, targets in graph.items():
        if name.startswith(("lrdaccel.planning", "lrdaccel.calibration", "lrdaccel.factorize", "lrdaccel.layers")):
            upward = sorted(t for t in targets if t.startswith(later))
            assert not upward, f"{name} imports {upward}"


def test_no_module_over_400_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("path", ["lrdaccel.freezing", "lrdaccel.train", "lrdaccel.integrations",
                                  "lrdaccel.surgery", "lrdaccel.block_merge", "lrdaccel.sequential",
                                  "lrdaccel.calibrate", "lrdaccel.recalibrate", "lrdaccel.corpora"])
def test_paths_removed_in_0_3_are_gone(path):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(path)


def test_the_public_verbs_stay_functions_after_importing_their_modules():
    """`lrd.plan`, `lrd.decompose`, `lrd.finetune` and `lrd.race` are functions even after every module of
    their packages is imported by path."""
    for name in sorted(_module_name(p) for p in PACKAGE.rglob("*.py")):
        if not name.startswith("lrdaccel.cli"):
            importlib.import_module(name)
    assert callable(lrd.plan) and lrd.plan.__module__ == "lrdaccel.planning.planner"
    assert callable(lrd.decompose) and lrd.decompose.__module__ == "lrdaccel.decomposition.apply"
    assert callable(lrd.finetune) and lrd.finetune.__module__ == "lrdaccel.training.loop"
    assert callable(lrd.race) and lrd.race.__module__ == "lrdaccel.racing.api"
