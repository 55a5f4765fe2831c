"""`labfleet sweep`: an Optuna study over a spec, its trials on Ray, everything tracked in MLflow.

The driver is the study's only ask/tell client (Optuna's heartbeat does not work with ask/tell, and
SQLite dislikes parallel writers). Each Optuna trial is a `TrialRunner`: the spec with the sampled values
at the paths of `sweep.space`, run for every seed. At each evaluation the mean over the trial's seeds of
`sweep.metric` is reported; when the pruner says so, the trial's actors are stopped and it is told
PRUNED. Its objective is the mean over seeds of the final `sweep.metric`.

Running the same command again resumes the study: COMPLETE and PRUNED trials stay as they are and count
toward `n_trials`; trials a dead driver left RUNNING are told FAIL and their parameters run again; the
MLflow runs it left RUNNING are marked KILLED; the same `sweep` run collects the new trials.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from rich.console import Console
from rich.table import Table

from labfleet.errors import Problem, SpecError
from labfleet.orchestration.progress import ProgressBoard
from labfleet.orchestration.runner import TrialRunner, drive_once
from labfleet.orchestration.session import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TRIAL_FAILED,
    Planned,
    prepare,
    raise_interrupt,
)
from labfleet.spec.loading import apply_overrides, resolve_spec_data
from labfleet.spec.models import ExperimentSpec, ParamSpace, SweepConfig
from labfleet.tracking.runs import Tracker
from labfleet.tracking.uri import redact_uri, resolve_tracking_uri

DEFAULT_STORAGE = "sqlite:///optuna.db"
TrialState = optuna.trial.TrialState

class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for ask/tell: its `after_trial` only calls `study.stop()`, which works inside
    `study.optimize` alone; the driver asks `is_exhausted` itself instead."""

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        return None


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler, "grid": AskTellGridSampler,
}
PRUNERS = {
    "nop": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
}


# --- building the study's parts from the spec (all checked before anything starts) ------------------

def grid_values(path: str, p: ParamSpace) -> list[Any]:
    if p.type == "categorical":
        return list(p.choices or [])
    if p.step is None:
        raise ValueError(f"the grid sampler needs `choices` or a `step` for {path}")
    assert p.low is not None and p.high is not None
    count = int(round((p.high - p.low) / p.step)) + 1
    values = [p.low + i * p.step for i in range(count)]
    return [int(v) for v in values] if p.type == "int" else values


def build_sampler(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    kwargs = dict(sweep.sampler.model_extra or {})
    if sweep.sampler.seed is not None:
        kwargs["seed"] = sweep.sampler.seed
    if sweep.sampler.type == "tpe" and sweep.max_parallel > 1:
        kwargs.setdefault("constant_liar", True)  # parallel trials should not all sample the same point
    if sweep.sampler.type == "grid":
        kwargs["search_space"] = {path: grid_values(path, p) for path, p in sweep.space.items()}
    return SAMPLERS[sweep.sampler.type](**kwargs)


def build_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    return PRUNERS[sweep.pruner.type](**dict(sweep.pruner.model_extra or {}))


def suggest(trial: optuna.Trial, path: str, p: ParamSpace) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(path, p.choices or [])
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)


def check_sweep(data: dict[str, Any], spec: ExperimentSpec, source: str) -> SweepConfig:
    """The sweep section's own problems: missing, sampler/pruner arguments, and every searched path
    with its extreme values applied to the spec."""
    if spec.sweep is None:
        raise SpecError([Problem(source, "sweep", "labfleet sweep needs a `sweep:` section (see the README)")])
    sweep = spec.sweep
    problems: list[Problem] = []
    if not sweep.space:
        problems.append(Problem(source, "sweep.space", "name at least one path to search"))
    for name, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        try:
            build(sweep)
        except (TypeError, ValueError, ImportError) as exc:
            problems.append(Problem(source, f"sweep.{name}", f"{type(exc).__name__}: {exc}"))
    for path, p in sweep.space.items():
        extremes: list[Any] = list(p.choices or []) if p.type == "categorical" else [p.low, p.high]
        for value in extremes:
            value = int(value) if p.type == "int" and value is not None else value
            try:
                resolve_spec_data(apply_overrides(data, {path: value}), source, check_env=False)
            except SpecError as exc:
                problems.extend(Problem(source, f"sweep.space.{path}", f"with {value!r}: {q.path}: {q.message}")
                                for q in exc.problems)
    if problems:
        raise SpecError(problems)
    return sweep


# --- the driver -----------------------------------------------------------------------------------------

@dataclass
class ActiveTrial:
    trial: optuna.Trial
    runner: TrialRunner
    reported: int = -1  # last step told to the pruner


def execute_sweep(data: dict[str, Any], spec: ExperimentSpec, spec_path: Path, *, storage: str | None,
                  n_trials: int | None, cli_tracking_uri: str | None, address: str | None, console: Console,
                  quiet: bool = False) -> int:
    source = str(spec_path)
    sweep = check_sweep(data, spec, source)
    storage_url = storage or sweep.storage or DEFAULT_STORAGE
    study_name = sweep.study_name or spec.name
    total = n_trials or sweep.n_trials
    uri, tracker = prepare([Planned(spec, spec_path)], source=source, address=address,
                           tracking_uri=resolve_tracking_uri(cli_tracking_uri, spec.tracking.uri))
    study = optuna.create_study(storage=storage_url, study_name=study_name, direction=sweep.direction,
                                sampler=build_sampler(sweep), pruner=build_pruner(sweep), load_if_exists=True)
    experiment = spec.tracking.experiment or spec.name
    sweep_run = _sweep_run(tracker, experiment, study_name, storage_url, sweep)
    _recover(study, tracker, experiment, sweep_run)

    active: dict[int, ActiveTrial] = {}
    asked: set[int] = set()  # trials asked by this invocation (for the exit code)
    previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        with ProgressBoard(console, quiet) as board:
            while True:
                while len(active) < sweep.max_parallel and _finished(study) + len(active) < total \
                        and not _exhausted(study, sweep):
                    started = _start_trial(study, data, spec, source, sweep, tracker, sweep_run, board, asked)
                    if started is not None:
                        active[started.trial.number] = started
                if not active:
                    break
                drive_once([a.runner for a in active.values()])
                for number in list(active):
                    if _advance(study, active[number], sweep, tracker):
                        del active[number]
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _interrupted(study, list(active.values()), asked, tracker)
        console.print("[yellow]interrupted: running trials told FAIL (their parameters are queued again); run "
                      "the same command to resume[/yellow]")
        return EXIT_INTERRUPTED
    except BaseException as exc:
        for a in active.values():
            a.runner.abort("FAILED")
            study.tell(a.trial, state=TrialState.FAIL, skip_if_finished=True)
        tracker.close_open_runs("FAILED", f"driver error: {type(exc).__name__}: {exc}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    return _finish(study, sweep, tracker, sweep_run, console, uri, quiet, asked)


def _sweep_run(tracker: Tracker, experiment: str, study_name: str, storage: str, sweep: SweepConfig) -> str:
    """The study's `sweep` run: the one an earlier invocation made (reopened), or a new one."""
    shown = redact_uri(storage)
    tracker.experiment_id(experiment)
    found = tracker.client.search_runs(
        [tracker.experiment_id(experiment)],
        f"tags.`labfleet.role` = 'sweep' and tags.`optuna.study_name` = '{study_name}' "
        f"and tags.`optuna.storage` = '{shown}'", max_results=1)
    space = json.dumps({k: v.model_dump(exclude_none=True) for k, v in sweep.space.items()}, sort_keys=True)
    if found:
        run_id = found[0].info.run_id
        tracker.client.update_run(run_id, status="RUNNING")
        tracker.open_runs[run_id] = "sweep"
        return run_id
    return tracker.start_run(experiment, "sweep", study_name, tags={"optuna.study_name": study_name,
                                                                     "optuna.storage": shown},
                             params={"sweep.space": space[:6000], "sweep.metric": sweep.metric,
                                     "sweep.direction": sweep.direction})


def _recover(study: optuna.Study, tracker: Tracker, experiment: str, sweep_run: str) -> None:
    """Undo what a dead driver left: RUNNING trials -> FAIL (parameters queued again), RUNNING runs -> KILLED."""
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _fail_and_requeue(study, frozen)
    experiment_id = tracker.experiment_id(experiment)
    stale = tracker.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run}' "
                                                        f"and attributes.status = 'RUNNING'")
    for trial_run in stale:
        seeds = tracker.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{trial_run.info.run_id}' "
                                                            f"and attributes.status = 'RUNNING'")
        for run in [*seeds, trial_run]:
            tracker.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            tracker.client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))


def _interrupted(study: optuna.Study, active: list[ActiveTrial], asked: set[int], tracker: Tracker) -> None:
    """Ctrl-C: stop the running trials; every trial this invocation asked and did not finish (also one
    asked a moment before the signal, not yet started) is told FAIL with its parameters queued again;
    every open run ends KILLED."""
    for a in active:
        a.runner.abort("KILLED")
        tracker.set_tags(a.runner.trial_run_id or "", {"optuna.state": "FAIL"})
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number in asked:
            _fail_and_requeue(study, frozen)
    tracker.close_open_runs("KILLED")


def _fail_and_requeue(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Tell an unfinished trial FAIL and queue its parameters again. A trial stopped before it sampled
    anything has no parameters to repeat: the next ask samples afresh anyway."""
    study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    if frozen.params:
        study.enqueue_trial(frozen.params, user_attrs={"labfleet.retry_of": frozen.number})


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _exhausted(study: optuna.Study, sweep: SweepConfig) -> bool:
    """A grid is used up once every point is running or finished (Optuna's `is_exhausted` does not count
    running trials, so parallel trials would repeat points)."""
    if sweep.sampler.type != "grid":
        return False
    size = math.prod(len(grid_values(path, p)) for path, p in sweep.space.items())
    taken = {tuple(sorted(t.params.items())) for t in study.get_trials(
        deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))}
    return len(taken) >= size


def _start_trial(study: optuna.Study, data: dict[str, Any], spec: ExperimentSpec, source: str, sweep: SweepConfig,
                 tracker: Tracker, sweep_run: str, board: ProgressBoard, asked: set[int]) -> ActiveTrial | None:
    trial = study.ask()
    asked.add(trial.number)
    values = {path: suggest(trial, path, p) for path, p in sweep.space.items()}
    try:
        trial_spec = resolve_spec_data(apply_overrides(data, values), source, check_env=False)
    except SpecError as exc:  # a combination of values the algorithm rejects
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        return None
    runner = TrialRunner(trial_spec, tracker, parent_run_id=sweep_run, progress=board,
                         label=f"{spec.name}/trial={trial.number}",
                         trial_tags={"optuna.trial_number": str(trial.number), "optuna.state": "RUNNING"})
    runner.start()
    assert runner.trial_run_id is not None
    trial.set_user_attr("mlflow_run_id", runner.trial_run_id)
    tracker.log_params(runner.trial_run_id, {f"sampled.{k}": str(v) for k, v in values.items()})
    return ActiveTrial(trial, runner)


def _advance(study: optuna.Study, active: ActiveTrial, sweep: SweepConfig, tracker: Tracker) -> bool:
    """Report new intermediate values, prune, or tell the result; True once the trial is over."""
    runner, trial = active.runner, active.trial
    run_id = runner.trial_run_id or ""
    # Every new evaluation step, in order, also when the results came with the end of the trial (a fast
    # trial can finish within one chunk): the pruner sees the same sequence either way.
    for step, value in runner.eval_means(sweep.metric).items():
        if step <= active.reported:
            continue
        active.reported = step
        trial.report(value, step)
        tracker.log_metrics(run_id, {f"intermediate/{sweep.metric}": value}, step)
        if trial.should_prune():
            runner.abort("KILLED")  # a trial that already finished keeps its FINISHED run
            study.tell(trial, state=TrialState.PRUNED)
            tracker.set_tags(run_id, {"optuna.state": "PRUNED"})
            return True
    if not runner.done:
        return False
    if runner.status == "FINISHED":
        finals = [s.final[sweep.metric] for s in runner.seeds.values() if s.final and sweep.metric in s.final]
        if len(finals) == len(runner.seeds):
            study.tell(trial, sum(finals) / len(finals))
            tracker.set_tags(run_id, {"optuna.state": "COMPLETE"})
            return True
        error = f"the trial's final evaluation has no {sweep.metric!r}"
    else:
        error = "; ".join(f"seed {s.seed}: {s.error}" for s in runner.seeds.values() if s.error)[-4000:]
    trial.set_user_attr("error", error or runner.status)
    study.tell(trial, state=TrialState.FAIL)
    tracker.set_tags(run_id, {"optuna.state": "FAIL"})
    return True


def _finish(study: optuna.Study, sweep: SweepConfig, tracker: Tracker, sweep_run: str, console: Console, uri: str,
            quiet: bool, asked: set[int]) -> int:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        tracker.log_metrics(sweep_run, {"best_value": float(best.value or 0.0)}, len(trials))
        tracker.set_tags(sweep_run, {"best.trial_number": str(best.number),
                                     **{f"best.{k}": str(v) for k, v in best.params.items()}})
    failed_now = [t for t in trials if t.state == TrialState.FAIL and t.number in asked]
    tracker.end_run(sweep_run, "FINISHED")
    if not quiet:
        console.print(leaderboard(study, sweep))
    console.print(f"Study {study.study_name}: {len(complete)} complete, "
                  f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
                  f"{sum(t.state == TrialState.FAIL for t in trials)} failed. Runs are in {redact_uri(uri)}.",
                  highlight=False)
    for t in failed_now:
        console.print(f"[red]trial {t.number} failed:[/red] {str(t.user_attrs.get('error', ''))[-300:]}",
                      highlight=False)
    return EXIT_TRIAL_FAILED if failed_now else EXIT_OK


def leaderboard(study: optuna.Study, sweep: SweepConfig, rows: int = 20) -> Table:
    table = Table(title=f"{study.study_name}: {sweep.metric} ({sweep.direction})")
    for column in ("trial", "state", "value", *sweep.space):
        table.add_column(column)
    sign = -1.0 if sweep.direction == "maximize" else 1.0
    rank = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}  # a pruned trial's value is its last report
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: (rank.get(t.state, 2), t.value is None, sign * (t.value or 0.0)))
    for t in trials[:rows]:
        table.add_row(str(t.number), t.state.name, "" if t.value is None else f"{t.value:.4g}",
                      *(_short(t.params.get(p, "")) for p in sweep.space))
    return table


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
