"""Hyperparameter documentation generated from the pydantic models (for `labfleet show`)."""

from __future__ import annotations

import json
import re
import types
import typing

from pydantic import BaseModel


def _type_name(annotation: typing.Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _default(field: typing.Any) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    return "required" if value is ... or repr(value) == "PydanticUndefined" else json.dumps(value, default=str)


def hparam_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for every field of the model, in declaration order."""
    return [(name, _type_name(field.annotation), _default(field), field.description or "")
            for name, field in model.model_fields.items()]


def spec_skeleton(algorithm: str) -> str:
    """A spec for `algorithm` with every hyperparameter at its default, each documented in a comment
    (`labfleet show ALGORITHM --yaml`); it validates as it is once `env:` or `dataset:` names something."""
    import yaml

    from labfleet.algorithms import registry

    info = registry.get(algorithm)
    defaults = info.hparams().model_dump(mode="json")
    unit = info.budget_units[0]
    if info.kind == "rl":  # an env the algorithm can run on, to replace with one's own
        env = "FrozenLake-v1" if "vector" not in info.observation_spaces else \
            "Pendulum-v1" if "discrete" not in info.action_spaces else "CartPole-v1"
        target = f"env: {env}            # a gymnasium id (labfleet list envs), or package.module:Class"
    elif info.kind == "custom":  # the user's own code: its data is its own; an env only where it steps one
        target, unit = "# env: CartPole-v1          # only if your trainer steps a gymnasium env", "iterations"
    else:
        target = "dataset: digits             # labfleet list datasets"
    name = "my-" + (re.sub(r"[^a-z0-9]+", "-", algorithm.rpartition(":")[2].lower()).strip("-") or "trainer")
    lines = [f"# {algorithm}: {info.summary}", f"name: {name}", f"algorithm: {algorithm}",
             target, "seeds: [0, 1, 2]", f"budget: {{{unit}: {100_000 if unit == 'env_steps' else 1000}}}", "hparams:"]
    docs = {name: description for name, _, _, description in hparam_rows(info.hparams)}
    for name, value in defaults.items():
        text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()[1:-1]  # the outer {}
        comment = f"  # {docs[name]}" if docs.get(name) else ""
        lines.append(f"  {text}{comment}")
    lines += ["eval: {episodes: 10}", f"tracking: {{experiment: {name if info.kind == 'custom' else algorithm}}}"]
    return "\n".join(lines) + "\n"


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, kind, default, description in hparam_rows(model):
        cell = description.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | `{kind.replace('|', '/')}` | `{default.replace('|', '/')}` | {cell} |")
    return lines


def reference_markdown() -> str:
    """docs/spec-reference.md, generated from the spec models and every algorithm's hparams model.
    Regenerate with `python -m labfleet.spec.schema > docs/spec-reference.md` (a test fails when stale)."""
    from labfleet.algorithms import registry
    from labfleet.data.datasets import DATASETS
    from labfleet.spec import models as m

    out = ["# Spec reference", "",
           "Generated from the pydantic models by `python -m labfleet.spec.schema > docs/spec-reference.md`;",
           "`tests/test_docs.py` fails when this page and the code disagree. Every model rejects unknown "
           "fields.", ""]
    sections: list[tuple[str, type[BaseModel], str]] = [
        ("Experiment spec", m.ExperimentSpec, "The top level of a spec file."),
        ("`budget`", m.Budget, "Exactly one field."),
        ("`resources`", m.Resources, "One placement group per seed."),
        ("`eval`", m.EvalConfig, ""),
        ("`tracking`", m.TrackingConfig, ""),
        ("`sweep`", m.SweepConfig, "Used by `labfleet sweep`."),
        ("`sweep.space.<path>`", m.ParamSpace, "One searched dimension (Optuna's suggest_* arguments)."),
        ("`sweep.sampler`", m.SamplerConfig, "Further keys are the Optuna sampler's keyword arguments."),
        ("`sweep.pruner`", m.PrunerConfig, "Further keys are the Optuna pruner's keyword arguments."),
        ("Suite file", m.SuiteSpec, "Run by `labfleet suite`."),
        ("`experiments[]` of a suite", m.SuiteEntry, ""),
    ]
    for title, model, note in sections:
        out += [f"## {title}", ""] + ([note, ""] if note else []) + _table(model) + [""]
    out += ["## Datasets", "", "| dataset | shape | summary |", "|---|---|---|"]
    out += [f"| `{name}` | {'x'.join(map(str, d.shape)) or 'from the file'} | {d.summary} |"
            for name, d in DATASETS.items()]
    out += ["", "## Algorithms: `hparams`", ""]
    for name in registry.names():
        info = registry.get(name)
        budget = " or ".join(info.budget_units)
        out += [f"### `{name}`", "", f"{info.summary}. Budget in {budget}; primary metric `{info.primary_metric}`.",
                ""] + _table(info.hparams) + [""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
