"""The package's import graph (issue 12): no cycles among labfleet's modules, and the reports never
import the driver. Every import counts, also those inside functions (a lazy import is still a
dependency); imports only for type checking do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "labfleet"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:  # `from pkg import name` names a module or an attribute
                    target = target.rpartition(".")[0]
                # The package root only re-exports (its `__getattr__` imports lazily) and holds the version.
                if target and target != name and target != "labfleet":
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("layer", ["labfleet.reporting", "labfleet.tracking", "labfleet.spec", "labfleet.algorithms"])
def test_lower_layers_do_not_import_the_driver(layer: str):
    graph = import_graph()
    offending = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(layer)
                       for t in targets if t.startswith("labfleet.orchestration") or t == "labfleet.cli")
    assert not offending, offending


def test_the_graph_sees_lazy_imports():
    """The check would pass vacuously if it missed imports inside functions: the CLI imports the driver
    only inside its commands."""
    assert "labfleet.orchestration.commands" in import_graph()["labfleet.cli"]


def test_the_cli_starts_without_mlflow_ray_or_optuna():
    """`labfleet --help`, `validate` and `list` answer in a fraction of a second: the CLI module and the tag
    names it uses import none of the heavy libraries (each command imports what it needs)."""
    import subprocess
    import sys

    code = ("import sys, labfleet.cli, labfleet.tracking.tags; "
            "print(sorted(m for m in ('mlflow', 'ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# What a `Tracker` writes (its lifecycle, `commit`, `drain`, `close`, `close_open_runs`, belongs to the session)
TRACKER_WRITES = {"start_run", "reopen_run", "log_params", "set_tags", "queue_tags", "log_metrics", "flush",
                  "log_bytes", "log_yaml", "end_run", "after_writes"}


def test_only_the_recorder_writes_the_run_hierarchy():
    """Listeners and commands decide; `MlflowRecorder` writes: no other module of the driver calls a
    tracker's writes (docs/architecture.md, "The driver core")."""
    homes = {PACKAGE / "orchestration" / "recorder.py", *(PACKAGE / "tracking").glob("*.py")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in homes:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in TRACKER_WRITES:
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) \
                    else owner.attr if isinstance(owner, ast.Attribute) else ""
                if name == "tracker":
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: tracker.{node.func.attr}")
    assert not found, "write through MlflowRecorder:\n" + "\n".join(found)
