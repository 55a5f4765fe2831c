"""Tag and metric names are defined once: run tags, MLflow's and Optuna's names in `tracking/tags.py`, metric
names in `metrics.py`. Elsewhere in the package code names them through those constants, never as string
literals (docstrings may mention them), so that a name cannot drift between the code that writes it and the
code that reads it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import labfleet
from labfleet import metrics
from labfleet.tracking import tags

PACKAGE = Path(labfleet.__file__).parent
HOMES = {PACKAGE / "tracking" / "tags.py", PACKAGE / "metrics.py"}


def names(module) -> dict[str, str]:
    return {value: name for name, value in vars(module).items() if name.isupper() and isinstance(value, str)}


def literals(path: Path) -> list[ast.Constant]:
    """The string constants of a module but its docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_tag_and_metric_names_are_literals_only_where_they_are_defined():
    tag_names, metric_names = names(tags), names(metrics)
    in_filter = re.compile(r"`((?:labfleet|mlflow|optuna)\.[A-Za-z_]+)`")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in HOMES:
            continue
        for node in literals(path):
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if node.value in tag_names:
                found.append(f"{where}: {node.value!r} (tags.{tag_names[node.value]})")
            elif node.value in metric_names:
                found.append(f"{where}: {node.value!r} (metrics.{metric_names[node.value]})")
            found += [f"{where}: {name!r} in a filter (tags.{tag_names.get(name, '?')})"
                      for name in in_filter.findall(node.value)]
    assert not found, "name these through their constants:\n" + "\n".join(found)


def test_every_metric_name_is_used():
    code = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py") if path not in HOMES)
    unused = [name for name in names(metrics).values() if not re.search(rf"\bM\.{name}\b|\bmetrics\.{name}\b", code)]
    assert not unused, unused
