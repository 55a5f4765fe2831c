"""labfleet from Python (a notebook, a script): the commands as functions, and the results as a DataFrame.

    import labfleet

    result = labfleet.run("experiments/quickstart.yaml", set={"seeds": [0, 1]}, tracking_uri="sqlite:///mlflow.db")
    result.ok                      # every seed finished
    table = result.results()       # one row per seed run: configuration, seed, state, final eval/* metrics
    labfleet.results("cartpole", tracking_uri="sqlite:///mlflow.db")    # any experiment, suite, sweep or run

Each call runs as the command does (`labfleet run`, `suite`, `sweep`): the same checks, the same runs in
MLflow, the same resume of what an interrupted call left. Bad input raises `labfleet.SpecError` (its
`problems` say file, field and what is allowed) before anything starts. The local Ray instance the first call
starts stays up for the next ones in the same process (`ray.shutdown()` stops it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labfleet import metrics as M
from labfleet.tracking import tags as tag

if TYPE_CHECKING:
    from labfleet.spec.models import ExperimentSpec

SpecSource = str | os.PathLike[str] | Mapping[str, Any]


@dataclass(frozen=True)
class Result:
    """What a call did: its exit code as the command's (0 ok, 1 a trial failed, 130 interrupted), the store,
    the experiment, and the runs it wrote (the trial runs; a suite's run first; a sweep's run)."""

    exit_code: int
    tracking_uri: str
    experiment: str
    run_ids: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def results(self) -> Any:
        """`labfleet.results` of the runs this call wrote: one row per seed run."""
        return results(list(self.run_ids), tracking_uri=self.tracking_uri)


def _prepare_process(address: str | None) -> None:
    """What the CLI does before Ray is imported: a local instance on 127.0.0.1, token auth, a SIGTERM that
    stops the call as Ctrl-C does, quiet libraries and no MLflow download bars."""
    from labfleet.cli import local_ray_on_loopback, quiet_libraries

    local_ray_on_loopback(address)
    quiet_libraries(bool(os.environ.get("LABFLEET_VERBOSE")))


def _resolve(spec: SpecSource, overrides: Mapping[str, Any] | None) -> tuple[dict[str, Any], Path, ExperimentSpec]:
    """(the spec's data with the overrides applied, its path, the resolved spec)."""
    from labfleet.spec.loading import apply_overrides, read_yaml, resolve_document, resolve_spec_data

    sets = dict(overrides or {})
    if isinstance(spec, Mapping):
        path = Path.cwd() / "<python>"
        data = apply_overrides(dict(spec), sets, source="set=")
        return data, path, resolve_spec_data(data, str(path))
    data, resolved = resolve_document(read_yaml(Path(spec)), sets, set_source="set=")
    return data, Path(spec), resolved


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(quiet=quiet)


def run(spec: SpecSource, *, set: Mapping[str, Any] | None = None, tracking_uri: str | None = None,  # noqa: A002
        address: str | None = None, quiet: bool = False, fresh: bool = False,
        tensorboard: str | os.PathLike[str] | None = None) -> Result:
    """`labfleet run`: every seed of a spec (a YAML file, or the spec as a mapping) as one trial.

    `set`: overrides as `--set` takes them, by dotted key (`{"hparams.gamma": 0.98, "seeds": [3, 4]}`)."""
    _prepare_process(address)
    from labfleet.orchestration.commands import execute
    from labfleet.orchestration.session import Planned

    _, path, resolved = _resolve(spec, set)
    outcome = execute([Planned(resolved, path)], source=str(path), cli_tracking_uri=tracking_uri, address=address,
                      console=_console(quiet), quiet=quiet, fresh=fresh,
                      tensorboard=Path(tensorboard) if tensorboard else None)
    return Result(outcome.code, outcome.tracking_uri, resolved.tracking.experiment or resolved.name, outcome.run_ids)


def suite(path: str | os.PathLike[str], *, set: Mapping[str, Any] | None = None,  # noqa: A002
          tracking_uri: str | None = None, address: str | None = None, quiet: bool = False, fresh: bool = False,
          tensorboard: str | os.PathLike[str] | None = None) -> Result:
    """`labfleet suite`: every experiment of a suite file under one suite run (`set` applies to each)."""
    _prepare_process(address)
    from labfleet.orchestration.commands import execute
    from labfleet.orchestration.session import Planned
    from labfleet.spec.loading import load_suite

    suite_spec, entries = load_suite(Path(path), dict(set or {}))
    planned = [Planned(e.spec, e.spec_path, e.data if e.entry.sweep else None) for e in entries]
    outcome = execute(planned, source=str(path), cli_tracking_uri=tracking_uri, address=address,
                      console=_console(quiet), quiet=quiet, suite=suite_spec, fresh=fresh,
                      tensorboard=Path(tensorboard) if tensorboard else None)
    return Result(outcome.code, outcome.tracking_uri, suite_spec.tracking.experiment or suite_spec.name,
                  outcome.run_ids)


def sweep(spec: SpecSource, *, set: Mapping[str, Any] | None = None, n_trials: int | None = None,  # noqa: A002
          storage: str | None = None, tracking_uri: str | None = None, address: str | None = None,
          quiet: bool = False, tensorboard: str | os.PathLike[str] | None = None) -> Result:
    """`labfleet sweep`: the Optuna study of the spec's `sweep:` section (again: the study resumes).
    `optuna.load_study(study_name=..., storage=...)` reads the study itself."""
    _prepare_process(address)
    from labfleet.orchestration.commands import execute_sweep

    data, path, resolved = _resolve(spec, set)
    outcome = execute_sweep(data, resolved, path, storage=storage, n_trials=n_trials, cli_tracking_uri=tracking_uri,
                            address=address, console=_console(quiet), quiet=quiet,
                            tensorboard=Path(tensorboard) if tensorboard else None)
    return Result(outcome.code, outcome.tracking_uri, resolved.tracking.experiment or resolved.name, outcome.run_ids)


def results(target: str | list[str] | Result, *, tracking_uri: str | None = None) -> Any:
    """A `pandas.DataFrame` with one row per seed run of `target` (an experiment name, the name of a suite or
    sweep run, a run id, a list of run ids, or a `Result`): `experiment`, `configuration` (the trial run's
    name), `config_hash`, `algorithm`, `task` (env or dataset), `seed`, `state`, `trial_run_id`, `run_id`,
    then one column per final `eval/*` metric (NaN where a seed has none)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from labfleet.errors import Problem, SpecError
    from labfleet.reporting.report import resolve_target
    from labfleet.tracking.uri import resolve_tracking_uri, sqlite_path

    if isinstance(target, Result):
        tracking_uri, target = tracking_uri or target.tracking_uri, list(target.run_ids)
    uri = resolve_tracking_uri(tracking_uri, None)
    path = sqlite_path(uri)
    if path is not None and not path.exists():  # reading must not create an empty store
        raise SpecError([Problem("labfleet.results", "tracking_uri", f"no MLflow store at {path}")])
    client = MlflowClient(uri)
    rows: list[dict[str, Any]] = []
    for name in [target] if isinstance(target, str) else target:
        resolved = resolve_target(client, name, "labfleet.results")
        experiment = client.get_experiment(resolved.experiment_id).name
        for config in resolved.configurations:
            tags = config.trial.data.tags
            for run in config.seeds:
                rows.append({
                    "experiment": experiment, "configuration": config.label,
                    "config_hash": tags.get(tag.CONFIG_HASH, ""), "algorithm": config.algorithm,
                    "task": tags.get(tag.ENV) or tags.get(tag.DATASET, ""),
                    "seed": int(run.data.tags.get(tag.SEED, -1)), "state": run.info.status,
                    "trial_run_id": run.data.tags.get(tag.PARENT, config.trial.info.run_id),
                    "run_id": run.info.run_id,
                    **{k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(M.EVAL_PREFIX)}})
    columns = ["experiment", "configuration", "config_hash", "algorithm", "task", "seed", "state", "trial_run_id",
               "run_id"]
    frame = pd.DataFrame(rows, columns=columns + sorted({k for row in rows for k in row} - set(columns)))
    return frame.drop_duplicates("run_id").reset_index(drop=True)
