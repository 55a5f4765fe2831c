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
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from labfleet.errors import Problem, SpecError
from labfleet.orchestration.progress import ProgressBoard
from labfleet.orchestration.runner import ActorPool, TrialRunner, drive_once
from labfleet.orchestration.session import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TRIAL_FAILED,
    TERMINATED,
    Planned,
    ignore_interrupts,
    interrupts_deferred,
    prepare,
    raise_interrupt,
    release_after_interrupt,
)
from labfleet.spec.loading import apply_overrides, resolve_spec_data
from labfleet.spec.models import ExperimentSpec, ParamSpace, SweepConfig
from labfleet.tracking.runs import Tracker
from labfleet.tracking.uri import redact_uri, resolve_tracking_uri

DEFAULT_STORAGE = "sqlite:///optuna.db"
if not os.environ.get("LABFLEET_VERBOSE"):  # "A new study created ..." and the like: see `labfleet --verbose`
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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

JOURNAL_PREFIX = "journal:"


def journal_path(url: str) -> str | None:
    """The file of an Optuna journal storage: `journal:PATH`, or a plain path ending in .log / .jsonl."""
    if url.startswith(JOURNAL_PREFIX):
        return url[len(JOURNAL_PREFIX):].removeprefix("//")
    if "://" not in url and url.endswith((".log", ".jsonl")):
        return url
    return None


def storage_problem(url: str) -> str | None:
    """Why `url` cannot name an Optuna storage (checked without connecting or writing anything)."""
    path = journal_path(url)
    if path is not None:
        parent = Path(path).expanduser().resolve().parent
        return None if parent.is_dir() else f"the journal file's directory {parent} does not exist"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        return (f"not a storage URL ({exc}); use a SQLAlchemy URL such as sqlite:///optuna.db or "
                f"postgresql://user@host/db, or journal:PATH for an Optuna journal file")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parent = Path(parsed.database).expanduser().resolve().parent
        if not parent.is_dir():
            return f"the SQLite file's directory {parent} does not exist"
    return None


def build_storage(url: str) -> str | optuna.storages.BaseStorage:
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(path).expanduser())))
    return url


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


def check_sweep(data: dict[str, Any], spec: ExperimentSpec, source: str, storage: str | None = None) -> SweepConfig:
    """The sweep section's own problems: missing, the storage URL, sampler/pruner arguments, and every
    searched path with its extreme values applied to the spec."""
    if spec.sweep is None:
        raise SpecError([Problem(source, "sweep", "labfleet sweep needs a `sweep:` section (see the README)")])
    sweep = spec.sweep
    problems: list[Problem] = []
    url = storage or sweep.storage or DEFAULT_STORAGE
    if (reason := storage_problem(url)) is not None:
        problems.append(Problem(source, "--storage" if storage else "sweep.storage", f"{redact_uri(url)}: {reason}"))
    if not sweep.space:
        problems.append(Problem(source, "sweep.space", "name at least one path to search"))
    for name, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        try:
            build(sweep)
        except (TypeError, ValueError, ImportError) as exc:
            problems.append(Problem(source, f"sweep.{name}", f"{type(exc).__name__}: {exc}"))
    problems += _objective_problems(sweep, spec, source)
    for path, p in sweep.space.items():
        for value in _probe_values(p):
            try:
                resolve_spec_data(apply_overrides(data, {path: value}), source, check_env=False)
            except SpecError as exc:
                problems.extend(Problem(source, f"sweep.space.{path}", f"with {value!r}: {q.path}: {q.message}")
                                for q in exc.problems)
    if problems:
        raise SpecError(problems)
    return sweep


def _probe_values(p: ParamSpace) -> list[Any]:
    """The values of a space that validation applies to the spec: every choice, or both ends and, for a
    float space, a point inside (a float range over an int field fails there, not at its integral ends)."""
    if p.type == "categorical":
        return list(p.choices or [])
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return [int(p.low), int(p.high)]
    inside = math.sqrt(p.low * p.high) if p.log else p.low + 0.371 * (p.high - p.low)
    if p.step is not None:
        inside = p.low + round((inside - p.low) / p.step) * p.step
    return [p.low, p.high] + ([inside] if p.low < inside < p.high else [])


def _objective_problems(sweep: SweepConfig, spec: ExperimentSpec, source: str) -> list[Problem]:
    """Each objective must be an `eval/*` metric the algorithm logs (a trial aggregates only those)."""
    from labfleet.algorithms import registry

    info = registry.get(spec.algorithm)
    if info.kind == "custom":  # your own code's metrics are known when it runs: a missing one fails the trial
        return []
    logged = info.eval_metrics
    field = "sweep.metrics" if sweep.multi_objective else "sweep.metric"
    return [Problem(source, field, f"{spec.algorithm} never logs {metric!r}; a sweep objective is one of its "
                    f"evaluation metrics: {', '.join(logged)}")
            for metric, _ in sweep.objectives if metric not in logged]


# --- the driver -----------------------------------------------------------------------------------------

@dataclass
class ActiveTrial:
    trial: optuna.Trial
    runner: TrialRunner
    reported: int = -1  # last step told to the pruner
    latest: float | None = None  # its latest intermediate value
    error: str | None = None  # why it failed


@dataclass
class FailureStreak:
    """Failed trials in a row: a sweep that cannot succeed (every trial fails the same way) stops asking
    once `limit` have, instead of failing trials for ever (`n_trials` counts only finished ones)."""

    limit: int
    count: int = 0
    last: str = ""

    def record(self, state: TrialState, error: str | None) -> None:
        self.count = self.count + 1 if state == TrialState.FAIL else 0
        self.last = error or self.last

    @property
    def stopped(self) -> bool:
        return self.count >= self.limit


class TrialBoard:
    """The live table of trials (number, state, params, latest value, best so far) below the progress
    bars on a terminal; one line per finished trial in plain output."""

    SHOWN_FINISHED = 8

    def __init__(self, study: optuna.Study, sweep: SweepConfig, board: ProgressBoard):
        self.sweep, self.board, self.study_name = sweep, board, study.study_name
        self.finished: list[tuple[int, str, Any, dict[str, Any]]] = []  # (number, state, value, params)
        self.best: tuple[int, float] | None = None
        if not sweep.multi_objective and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            self.best = (best.number, float(best.value or 0.0))

    def refresh(self, active: dict[int, ActiveTrial]) -> None:
        if not self.board.live:
            return
        names = [name for name, _ in self.sweep.objectives]
        table = Table(title=f"{self.study_name}: " + ", ".join(f"{m} ({d})" for m, d in self.sweep.objectives),
                      title_justify="left")
        last = "latest" if len(names) == 1 else "values"
        for column in ("trial", "state", *map(param_column, self.sweep.space), last):
            table.add_column(column, overflow="fold")
        for number, a in sorted(active.items()):
            table.add_row(str(number), "RUNNING", *(_short(a.trial.params.get(p, "")) for p in self.sweep.space),
                          "" if a.latest is None else _short(a.latest))
        for number, state, value, params in self.finished[-self.SHOWN_FINISHED:][::-1]:
            style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "")
            table.add_row(str(number), state, *(_short(params.get(p, "")) for p in self.sweep.space),
                          _short(value), style=style)
        if self.best is not None:
            table.caption = f"best so far: {_short(self.best[1])} (trial {self.best[0]})"
        self.board.below = table

    def told(self, a: ActiveTrial, state: TrialState, value: Any) -> None:
        number = a.trial.number
        self.finished.append((number, state.name, value, dict(a.trial.params)))
        if state == TrialState.COMPLETE and not self.sweep.multi_objective:
            sign = 1.0 if self.sweep.direction == "maximize" else -1.0
            if self.best is None or sign * value > sign * self.best[1]:
                self.best = (number, float(value))
        best = f"; best {_short(self.best[1])} (trial {self.best[0]})" if self.best else ""
        params = ", ".join(f"{k}={_short(v)}" for k, v in a.trial.params.items())
        what = (a.error or "no reason recorded").strip().splitlines()[-1][:200] if state == TrialState.FAIL \
            else _short(value)
        self.board.note(f"trial {number} {state.name}: {what} [{params}]{best}")


def execute_sweep(data: dict[str, Any], spec: ExperimentSpec, spec_path: Path, *, storage: str | None,
                  n_trials: int | None, cli_tracking_uri: str | None, address: str | None, console: Console,
                  quiet: bool = False, attach: tuple[Tracker, str | None, str] | None = None) -> int:
    """`attach` = (tracker, parent run id, experiment): a sweep inside a suite, on the suite's tracker."""
    source = str(spec_path)
    sweep = check_sweep(data, spec, source, storage)
    storage_url = storage or sweep.storage or DEFAULT_STORAGE
    study_name = sweep.study_name or spec.name
    total = n_trials or sweep.n_trials
    if attach is None:
        uri, tracker = prepare([Planned(spec, spec_path)], source=source, address=address,
                               tracking_uri=resolve_tracking_uri(cli_tracking_uri, spec.tracking.uri))
        parent, experiment = None, spec.tracking.experiment or spec.name
    else:
        tracker, parent, experiment = attach
        uri = tracker.uri
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"experiment": experiment})})
        data = apply_overrides(data, {"tracking.experiment": experiment})
    if sweep.multi_objective and sweep.pruner.type != "nop":
        console.print(f"[yellow]note: a multi-objective study cannot prune; pruner {sweep.pruner.type!r} is not "
                      "used[/yellow]")
    study = optuna.create_study(storage=build_storage(storage_url), study_name=study_name,
                                directions=[d for _, d in sweep.objectives], sampler=build_sampler(sweep),
                                pruner=optuna.pruners.NopPruner() if sweep.multi_objective else build_pruner(sweep),
                                load_if_exists=True)
    sweep_run = _sweep_run(tracker, experiment, study_name, storage_url, sweep, parent)
    _recover(study, tracker, experiment, sweep_run)

    active: dict[int, ActiveTrial] = {}
    asked: set[int] = set()  # trials asked by this invocation (for the exit code)
    pool = ActorPool()  # trial actors are reused across trials of the same shape
    finished = _finished(study)  # COMPLETE + PRUNED, counted here rather than read back every loop
    streak = FailureStreak(sweep.max_consecutive_failures)
    previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        with ProgressBoard(console, quiet, hide_finished=True) as board:
            view = TrialBoard(study, sweep, board)
            while True:
                while len(active) < sweep.max_parallel and finished + len(active) < total \
                        and not (_exhausted(study, sweep) or streak.stopped):
                    started = _start_trial(study, data, spec, source, sweep, tracker, sweep_run, board, asked, pool)
                    if started is not None:
                        active[started.trial.number] = started
                    view.refresh(active)
                if not active:
                    break
                drive_once([a.runner for a in active.values()])
                for number in list(active):
                    told = _advance(study, active[number], sweep, tracker)
                    if told is not None:
                        a = active.pop(number)
                        view.told(a, *told)
                        streak.record(told[0], a.error)
                        finished += told[0] in (TrialState.COMPLETE, TrialState.PRUNED)
                view.refresh(active)
    except KeyboardInterrupt:
        ignore_interrupts()
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
        _shutdown(pool)
    return _finish(study, sweep, tracker, sweep_run, console, uri, quiet, asked, own_tracker=attach is None,
                   streak=streak)


def _sweep_run(tracker: Tracker, experiment: str, study_name: str, storage: str, sweep: SweepConfig,
               parent: str | None = None) -> str:
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
        tracker.reopen_run(run_id, "sweep")
        return run_id
    return tracker.start_run(experiment, "sweep", study_name, parent, tags={"optuna.study_name": study_name,
                                                                     "optuna.storage": shown},
                             params={"sweep.space": space[:6000],
                                     "sweep.metric": ",".join(m for m, _ in sweep.objectives),
                                     "sweep.direction": ",".join(d for _, d in sweep.objectives)})


def _recover(study: optuna.Study, tracker: Tracker, experiment: str, sweep_run: str) -> None:
    """Undo what a dead driver left and make MLflow agree with the study: RUNNING trials -> FAIL (parameters
    queued again); their trial runs, and every run still RUNNING under the sweep, take the trial's state as
    `optuna.state` and end (FINISHED for a COMPLETE trial, KILLED otherwise)."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in failed:
        _fail_and_requeue(study, frozen)
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    experiment_id = tracker.experiment_id(experiment)
    stale = {r.info.run_id: r for r in tracker.client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run}' and attributes.status = 'RUNNING'")}
    # A trial whose MLflow record was written just before the driver died, before Optuna was told (the
    # order `_tell` keeps), has a run that says COMPLETE or PRUNED: it is FAIL now.
    for frozen in failed:
        run_id = frozen.user_attrs.get("mlflow_run_id")
        if run_id and run_id not in stale:
            tracker.set_tags(run_id, {"optuna.state": "FAIL"})
    for trial_run in stale.values():
        state = states.get(int(trial_run.data.tags.get("optuna.trial_number", -1)), "FAIL")
        status = "FINISHED" if state in ("COMPLETE", "PRUNED") else "KILLED"
        seeds = tracker.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{trial_run.info.run_id}' "
                                                            f"and attributes.status = 'RUNNING'")
        for run in [*seeds, trial_run]:
            tracker.queue_tags(run.info.run_id, {"optuna.state": state})
            tracker.end_run(run.info.run_id, status)


def _interrupted(study: optuna.Study, active: list[ActiveTrial], asked: set[int], tracker: Tracker) -> None:
    """Ctrl-C: stop the running trials; every trial this invocation asked and did not finish (also one
    asked a moment before the signal, not yet started) is told FAIL with its parameters queued again;
    every open run ends KILLED."""
    for a in active:
        a.runner.abort("KILLED", release=False)  # the records first; Ray may be gone (see TrialRunner.abort)
        tracker.set_tags(a.runner.trial_run_id or "", {"optuna.state": "FAIL"})
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number in asked:
            _fail_and_requeue(study, frozen)
    tracker.close_open_runs("KILLED")
    release_after_interrupt([a.runner for a in active])


def _shutdown(pool: ActorPool) -> None:
    """Free the idle actors, unless a SIGTERM ended the command (they die with this driver then)."""
    if not TERMINATED.is_set():
        pool.shutdown()


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
                 tracker: Tracker, sweep_run: str, board: ProgressBoard, asked: set[int],
                 pool: ActorPool | None = None) -> ActiveTrial | None:
    with interrupts_deferred():  # a Ctrl-C inside ask() would leave a RUNNING trial no one knows of
        trial = study.ask()
        asked.add(trial.number)
    values = {path: suggest(trial, path, p) for path, p in sweep.space.items()}
    try:
        trial_spec = resolve_spec_data(apply_overrides(data, values), source, check_env=False)
        trial_spec = trial_spec.model_copy(update={"resources": trial_spec.resources.model_copy(
            update={"max_retries": sweep.max_retries})})
    except SpecError as exc:  # a combination of values the algorithm rejects
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        return None
    runner = TrialRunner(trial_spec, tracker, parent_run_id=sweep_run, progress=board,
                         label=f"{spec.name}/trial={trial.number}",
                         trial_tags={"optuna.trial_number": str(trial.number), "optuna.state": "RUNNING"},
                         trial_params={k: str(v) for k, v in values.items()}, pool=pool)
    runner.start()
    assert runner.trial_run_id is not None
    trial.set_user_attr("mlflow_run_id", runner.trial_run_id)
    return ActiveTrial(trial, runner)


def _advance(study: optuna.Study, active: ActiveTrial, sweep: SweepConfig,
             tracker: Tracker) -> tuple[TrialState, Any] | None:
    """Report new intermediate values, prune, or tell the result; (state, value) once the trial is over."""
    runner, trial = active.runner, active.trial
    run_id = runner.trial_run_id or ""
    # Every new evaluation step, in order, also when the results came with the end of the trial (a fast
    # trial can finish within one chunk): the pruner sees the same sequence either way. A multi-objective
    # study takes no intermediate values (Optuna cannot prune it); MLflow still gets them.
    for step, value in runner.eval_means(sweep.objectives[0][0]).items():
        if step <= active.reported:
            continue
        active.reported, active.latest = step, value
        tracker.log_metrics(run_id, {f"intermediate/{sweep.objectives[0][0]}": value}, step)
        if sweep.multi_objective:
            continue
        trial.report(value, step)
        if trial.should_prune():
            runner.abort("FINISHED")  # pruned is a normal end (ARCHITECTURE 5): FINISHED, optuna.state=PRUNED
            _tell(study, tracker, active, TrialState.PRUNED)
            return TrialState.PRUNED, value
    if not runner.done:
        tracker.flush(run_id)  # intermediate values show in MLflow while the trial runs
        return None
    if runner.status == "FINISHED":
        values, missing = [], []
        for metric, _ in sweep.objectives:
            finals = [s.final[metric] for s in runner.seeds.values() if s.final and metric in s.final]
            if len(finals) == len(runner.seeds):
                values.append(sum(finals) / len(finals))
            else:
                missing.append(metric)
        if not missing:
            result = values if sweep.multi_objective else values[0]
            _tell(study, tracker, active, TrialState.COMPLETE, result)
            return TrialState.COMPLETE, result
        error = f"the trial's final evaluation has no {', '.join(map(repr, missing))}"
    else:
        error = "; ".join(f"seed {s.seed}: {s.error}" for s in runner.seeds.values() if s.error)[-4000:]
    active.error = error or runner.status
    trial.set_user_attr("error", active.error)
    if runner.status == "FINISHED":  # its seeds trained, but the trial cannot count: the trial run FAILED
        tracker.end_run(run_id, "FAILED", active.error)
    _tell(study, tracker, active, TrialState.FAIL)
    return TrialState.FAIL, None


def _tell(study: optuna.Study, tracker: Tracker, active: ActiveTrial, state: TrialState, value: Any = None) -> None:
    """Tell Optuna only once the trial's MLflow record (final metrics, checkpoints, end status, the
    `optuna.state` tag) is written: a driver killed in between leaves a trial that `_recover` fails and
    runs again, never a COMPLETE trial whose MLflow record was lost with the writer's queue."""
    for run_id in [active.runner.trial_run_id or "", *(s.run_id for s in active.runner.seeds.values())]:
        tracker.set_tags(run_id, {"optuna.state": state.name})
    tracker.drain()
    if state == TrialState.COMPLETE:
        study.tell(active.trial, value)
    else:
        study.tell(active.trial, state=state)


def _finish(study: optuna.Study, sweep: SweepConfig, tracker: Tracker, sweep_run: str, console: Console, uri: str,
            quiet: bool, asked: set[int], own_tracker: bool = True, streak: FailureStreak | None = None) -> int:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and sweep.multi_objective:
        _log_pareto_front(study, sweep, tracker, sweep_run)
    elif complete:
        best = study.best_trial
        tracker.log_metrics(sweep_run, {"best_value": float(best.value or 0.0)}, len(trials))
        tracker.set_tags(sweep_run, {"best.trial_number": str(best.number),
                                     **{f"best.{k}": str(v) for k, v in best.params.items()}})
    failed_now = [t for t in trials if t.state == TrialState.FAIL and t.number in asked]
    tracker.end_run(sweep_run, "FINISHED")
    if own_tracker:
        tracker.close()  # every queued write is in the store before the summary says where the runs are
    if not quiet:
        console.print(leaderboard(study, sweep))
    if (line := best_line(study, sweep)) is not None:
        console.print(line, highlight=False, markup=False)
    console.print(f"Study {study.study_name}: {len(complete)} complete, "
                  f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
                  f"{sum(t.state == TrialState.FAIL for t in trials)} failed. Runs are in {redact_uri(uri)}; "
                  f"figures: labfleet report {study.study_name} --tracking-uri {redact_uri(uri)}", highlight=False)
    for t in failed_now:
        console.print(f"[red]trial {t.number} failed:[/red] {str(t.user_attrs.get('error', ''))[-300:]}",
                      highlight=False)
    if streak is not None and streak.stopped:
        console.print(f"[red]stopped: {streak.count} trials in a row failed (sweep.max_consecutive_failures); "
                      f"the last: {streak.last.strip()[-300:]}[/red]", highlight=False)
    return EXIT_TRIAL_FAILED if failed_now else EXIT_OK


def _log_pareto_front(study: optuna.Study, sweep: SweepConfig, tracker: Tracker, sweep_run: str) -> None:
    """The Pareto-optimal trials on the sweep run: a tag with their numbers, `pareto_front.json` (values
    and params of each) and, for two objectives, a plot of every complete trial with the front marked."""
    front = sorted(study.best_trials, key=lambda t: t.number)
    names = [m for m, _ in sweep.objectives]
    tracker.set_tags(sweep_run, {"pareto.trials": ",".join(str(t.number) for t in front),
                                 "pareto.size": str(len(front))})
    rows = [{"trial": t.number, "values": dict(zip(names, t.values, strict=True)), "params": t.params,
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in front]
    tracker.log_bytes(sweep_run, "pareto_front.json", json.dumps(rows, indent=2).encode())
    if len(names) == 2:
        tracker.log_bytes(sweep_run, "pareto_front.png", _pareto_png(study, names, {t.number for t in front}))


def _pareto_png(study: optuna.Study, names: list[str], front: set[int]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    others = [t for t in complete if t.number not in front]
    best = sorted((t for t in complete if t.number in front), key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in others], [t.values[1] for t in others], c="0.6", s=18, label="trials")
    ax.plot([t.values[0] for t in best], [t.values[1] for t in best], "o-", c="C3", ms=5, label="Pareto front")
    for t in best:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(study.study_name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def leaderboard(study: optuna.Study, sweep: SweepConfig, rows: int = 20) -> Table:
    names = [m for m, _ in sweep.objectives]
    table = Table(title=f"{study.study_name}: " + ", ".join(f"{m} ({d})" for m, d in sweep.objectives))
    for column in ("trial", "state", *names, *map(param_column, sweep.space)):
        table.add_column(column, overflow="fold")  # folded onto more lines, never cut
    rank = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}  # a pruned trial's value is its last report
    if sweep.multi_objective:  # the Pareto front first, then by the first objective
        front = {t.number for t in study.best_trials} if any(
            t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) else set()
        sign0 = -1.0 if sweep.objectives[0][1] == "maximize" else 1.0
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: (
            rank.get(t.state, 2), t.number not in front, t.values is None, sign0 * (t.values or [0.0])[0]))
    else:
        sign = -1.0 if sweep.direction == "maximize" else 1.0
        trials = sorted(study.get_trials(deepcopy=False),
                        key=lambda t: (rank.get(t.state, 2), t.value is None, sign * (t.value or 0.0)))
    for t in trials[:rows]:
        values = list(t.values) if t.values is not None else []
        shown = [f"{v:.4g}" for v in values] + [""] * (len(names) - len(values))
        state = t.state.name + (" *" if sweep.multi_objective and t.state == TrialState.COMPLETE
                                and t.number in front else "")
        table.add_row(str(t.number), state, *shown, *(_short(t.params.get(p, "")) for p in sweep.space))
    if sweep.multi_objective:
        table.caption = "* on the Pareto front"
    return table


def param_column(path: str) -> str:
    """A searched path as a column head: `hparams.` says nothing in a table of hyperparameters."""
    return path.removeprefix("hparams.")


def best_line(study: optuna.Study, sweep: SweepConfig) -> str | None:
    """The best trial with every parameter in full, for the end of the command."""
    if sweep.multi_objective or not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    params = "  ".join(f"{path}={value!r}" for path, value in best.params.items())
    return f"best: trial {best.number}, {sweep.metric} = {best.value!r}; {params}"


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_short(v) for v in value)
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
