"""`labfleet run`, `suite` and `sweep`: thin compositions of one `DriverSession` and its `drive`.

- `run` and `suite`: a `FixedFeed` of trials (one per spec), each continuing what a dead or interrupted
  driver left unless `--fresh`; a suite's sweep entries follow, one `OptunaSearcher` each, in the same
  session (one cluster, one tracker, one set of bars, one Ctrl-C).
- `sweep`: one `OptunaSearcher` over the spec's study; the same command again resumes the study.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from labfleet.errors import Problem, SpecError, shown
from labfleet.orchestration.events import SeedRecord, Status
from labfleet.orchestration.progress import summary_table
from labfleet.orchestration.runner import TrialMeta, TrialRunner, config_hash
from labfleet.orchestration.schedulers import SchedulerContext, build_scheduler
from labfleet.orchestration.searcher import OptunaSearcher, TrialState, recover
from labfleet.orchestration.session import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TRIAL_FAILED,
    DriverSession,
    FixedFeed,
    Planned,
    prepare,
)
from labfleet.orchestration.study import check_sweep, create_study
from labfleet.orchestration.sweep_view import TrialBoard, best_line, leaderboard, log_pareto_front
from labfleet.spec.loading import apply_overrides
from labfleet.spec.models import ExperimentSpec, SuiteSpec, SweepConfig
from labfleet.tracking import tags as tag
from labfleet.tracking.studies import DEFAULT_STORAGE, storage_open_problem
from labfleet.tracking.uri import DEFAULT_TRACKING_URI, redact_uri, resolve_tracking_uri


@dataclass(frozen=True)
class Outcome:
    """What a command did: its exit code, the store, and the runs it wrote (the trial runs of `run` and
    `suite`, with the suite run first; the sweep run of `sweep`)."""

    code: int
    tracking_uri: str
    run_ids: tuple[str, ...] = ()


def execute(planned: list[Planned], *, source: str, cli_tracking_uri: str | None, address: str | None,
            console: Console, quiet: bool = False, suite: SuiteSpec | None = None, fresh: bool = False,
            tensorboard: Path | None = None, in_process: bool = False) -> Outcome:
    """Train every planned spec (under one `suite` run when `suite` is given)."""
    spec_uri = suite.tracking.uri if suite else planned[0].spec.tracking.uri
    problems = [Problem(str(plan.spec_path), "sweep.storage", problem) for plan in planned
                if plan.sweep_data is not None and plan.spec.sweep is not None
                and (problem := storage_open_problem(plan.spec.sweep.storage or DEFAULT_STORAGE)) is not None]
    problems += _tensorboard_problems(tensorboard)
    if problems:
        raise SpecError(problems)
    uri, tracker, backend = prepare(planned, source=source, address=address, console=None if quiet else console,
                                    tracking_uri=resolve_tracking_uri(cli_tracking_uri, spec_uri),
                                    in_process=in_process)
    session = DriverSession(tracker, console, quiet, tensorboard=tensorboard, backend=backend)
    experiment = (suite.tracking.experiment or suite.name) if suite else None
    suite_run_id: str | None = None
    runners: list[TrialRunner] = []
    sweep_codes: list[int] = []
    with session:
        done: set[tuple[str, str]] = set()
        if suite is not None:
            assert experiment is not None
            suite_run_id, done = session.recorder.suite_run(experiment, suite.name, fresh)
        trials = _trials(session, planned, suite_run_id, experiment, done, fresh)
        runners = [runner for runner, _ in trials]
        session.drive(FixedFeed(trials))
        for plan in planned:  # a suite's sweep entries, one after another; each resumes its study
            if plan.sweep_data is not None:
                sweep_codes.append(run_sweep(session, plan.sweep_data, plan.spec, plan.spec_path, storage=None,
                                             n_trials=None, parent=suite_run_id,
                                             experiment=experiment or plan.spec.tracking.experiment or plan.spec.name,
                                             quiet=quiet))
    run_ids = tuple(([suite_run_id] if suite_run_id is not None else [])
                    + [session.recorder.trial_run_id(r) for r in runners if session.recorder.has_run(r)])
    if session.interrupted:
        if not sweep_codes and all(p.sweep_data is None for p in planned):
            console.print("[yellow]interrupted: every open run was marked KILLED[/yellow]")
        return Outcome(EXIT_INTERRUPTED, uri, run_ids)
    failed = [r for r in runners if r.status != Status.FINISHED]
    failed_sweeps = sum(code != EXIT_OK for code in sweep_codes)
    if suite_run_id is not None:
        error = "; ".join([f"{r.label}: {r.status}" for r in failed] + [f"{failed_sweeps} sweep(s) with failed trials"]
                          * bool(failed_sweeps))
        session.recorder.end(suite_run_id, "FAILED" if failed or failed_sweeps else "FINISHED", error or None)
    tracker.close()  # every queued write is in the store before the summary says where the runs are
    target = suite.name if suite else (runners[0].experiment if runners else "")
    _print_summary(console, session, runners, uri, quiet, target)
    return Outcome(EXIT_TRIAL_FAILED if failed or failed_sweeps else EXIT_OK, uri, run_ids)


def _tensorboard_problems(directory: Path | None) -> list[Problem]:
    from labfleet.orchestration.tensorboard import tensorboard_problem

    problem = tensorboard_problem(directory) if directory is not None else None
    return [Problem("--tensorboard", "", problem)] if problem else []


def _trials(session: DriverSession, planned: list[Planned], suite_run_id: str | None, experiment: str | None,
            done: set[tuple[str, str]], fresh: bool) -> list[tuple[TrialRunner, dict[int, SeedRecord] | None]]:
    """A trial per planned spec (not the sweep entries); one whose last invocation a dead or interrupted
    driver left unfinished continues it (the same runs, each unfinished seed from its last checkpoint)
    unless `fresh`."""
    trials: list[tuple[TrialRunner, dict[int, SeedRecord] | None]] = []
    for plan in planned:
        if plan.sweep_data is not None:
            continue
        if (plan.spec.name, config_hash(plan.spec)) in done:
            session.console.print(f"{plan.spec.name}: finished in the interrupted run of this suite, skipped",
                                  highlight=False)
            continue
        spec = plan.spec
        if experiment:  # nested runs show under their parent only within one experiment
            spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"experiment": experiment})})
        runner = session.runner(spec, meta=TrialMeta(suite_run_id, {tag.SPEC_FILE: str(plan.spec_path)},
                                                     spec_dir=str(plan.spec_path.parent)))
        found = None if fresh else session.recorder.unfinished(runner)
        for note in session.recorder.pop_notes():
            session.console.print(f"[yellow]{shown(note)}[/yellow]", highlight=False, soft_wrap=True)
        if found is None:
            trials.append((runner, None))
            continue
        run, records = found
        resumed = sorted(seed for seed, r in records.items() if r.status != Status.FINISHED and r.checkpoint)
        session.console.print(f"{runner.label}: continuing trial run {run.info.run_id} ({run.info.status}); "
                              f"from checkpoints: seeds {resumed or 'none'} (--fresh starts new runs)", highlight=False)
        trials.append((runner, records))
    return trials


def _print_summary(console: Console, session: DriverSession, runners: list[TrialRunner], uri: str, quiet: bool,
                   report_target: str = "") -> None:
    rows = []
    for runner in runners:
        for state in runner.seeds.values():
            metric = runner.info.primary_metric_for(runner.spec.dataset) or next(iter(sorted(state.final or {})), "")
            value = (state.final or {}).get(metric)
            rows.append({"trial": session.recorder.run_name(runner), "seed": str(state.seed),
                         "status": str(state.status),
                         "steps": str(state.progress), "metric": metric,
                         "value": "" if value is None else f"{value:.4g}", "time": f"{state.busy:.0f}s"})
    if not quiet:
        console.print(summary_table("labfleet results", rows))
    for runner in runners:
        for state in runner.seeds.values():
            if state.error:
                console.print(f"[red]{shown(runner.label)} seed {state.seed} failed:[/red] "
                              f"{shown(state.error.strip().splitlines()[-1][:500])}", highlight=False)
    store = shown(redact_uri(uri))
    flag = "" if uri == DEFAULT_TRACKING_URI else f" --tracking-uri {store}"
    where = f"Open them at {store}" if uri.startswith(("http://", "https://")) else (
        f"Open them with: labfleet ui{flag}  (or: mlflow ui --backend-store-uri {store} --host 127.0.0.1)")
    console.print(f"Runs are in {store} (experiment: {shown(runners[0].experiment) if runners else '-'}). {where}. "
                  f"Compare them with: labfleet report {shown(report_target)}{flag}", highlight=False)


# --- sweeps -------------------------------------------------------------------------------------------------

def execute_sweep(data: dict[str, Any], spec: ExperimentSpec, spec_path: Path, *, storage: str | None,
                  n_trials: int | None, cli_tracking_uri: str | None, address: str | None, console: Console,
                  quiet: bool = False, tensorboard: Path | None = None, in_process: bool = False) -> Outcome:
    """`labfleet sweep`: the study of the spec's `sweep:` section, on its own session."""
    sweep = check_sweep(data, spec, str(spec_path), storage)
    url = storage or sweep.storage or DEFAULT_STORAGE
    if (problem := storage_open_problem(url)) is not None:
        raise SpecError([Problem(str(spec_path), "--storage" if storage else "sweep.storage", problem)])
    if problems := _tensorboard_problems(tensorboard):
        raise SpecError(problems)
    tracking_uri = resolve_tracking_uri(cli_tracking_uri, spec.tracking.uri)
    if _already_done(sweep, sweep.study_name or spec.name, url, n_trials or sweep.n_trials, console, quiet,
                     tracking_uri):
        return Outcome(EXIT_OK, tracking_uri)
    uri, tracker, backend = prepare([Planned(spec, spec_path)], source=str(spec_path), address=address,
                                    tracking_uri=tracking_uri, console=None if quiet else console,
                                    in_process=in_process)
    session = DriverSession(tracker, console, quiet, hide_finished=True, tensorboard=tensorboard, backend=backend)
    code, sweep_runs = EXIT_OK, list[str]()
    with session:
        code = run_sweep(session, data, spec, spec_path, storage=storage, n_trials=n_trials, parent=None,
                         experiment=spec.tracking.experiment or spec.name, quiet=quiet, sweep_runs=sweep_runs)
    if session.interrupted:
        return Outcome(EXIT_INTERRUPTED, uri, tuple(sweep_runs))
    tracker.close()
    return Outcome(code, uri, tuple(sweep_runs))


def _already_done(sweep: SweepConfig, study_name: str, storage_url: str, wanted: int, console: Console, quiet: bool,
                  tracking_uri: str) -> bool:
    """A study that already has the finished trials wanted and none running: said at once, without starting
    Ray or opening the tracking store (a rerun of a finished sweep has nothing to do)."""
    import optuna

    from labfleet.orchestration.study import grid_size
    from labfleet.tracking.studies import build_storage
    from labfleet.tracking.uri import sqlite_path

    path = sqlite_path(storage_url)
    if path is not None and not path.exists():
        return False
    try:
        study = optuna.load_study(study_name=study_name, storage=build_storage(storage_url))
    except KeyError:  # no such study yet
        return False
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    if sweep.sampler.type == "grid":  # a grid has no more points than its size
        wanted = min(wanted, grid_size(sweep))
    if finished < wanted or any(t.state == TrialState.RUNNING for t in trials):
        return False
    if not quiet:
        console.print(leaderboard(study, sweep))
    if (line := best_line(study, sweep)) is not None:
        console.print(line, highlight=False, markup=False)
    console.print(f"Study {shown(study_name)} already has {finished} finished trials (wanted {wanted}): nothing to "
                  f"run. --n-trials N asks for more. Runs are in {redact_uri(tracking_uri)}", highlight=False)
    return True


def run_sweep(session: DriverSession, data: dict[str, Any], spec: ExperimentSpec, spec_path: Path, *,
              storage: str | None, n_trials: int | None, parent: str | None, experiment: str, quiet: bool,
              sweep_runs: list[str] | None = None) -> int:
    """One study driven inside `session` (alone, or as a suite's entry under the suite run `parent`); its
    sweep run's id is appended to `sweep_runs` as soon as it exists."""
    source = str(spec_path)
    sweep = check_sweep(data, spec, source, storage)
    storage_url = storage or sweep.storage or DEFAULT_STORAGE
    study_name = sweep.study_name or spec.name
    if experiment != (spec.tracking.experiment or spec.name):  # nested under a suite: its experiment
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"experiment": experiment})})
        data = apply_overrides(data, {"tracking.experiment": experiment})
    console = session.console
    if (sweep.multi_objective or sweep.scheduler) and sweep.pruner.type != "nop":
        why = "population-based training stops no trial" if sweep.scheduler else "a multi-objective study cannot prune"
        console.print(f"[yellow]note: {why}; pruner {sweep.pruner.type!r} is not used[/yellow]")
    study = create_study(sweep, study_name, storage_url)
    space = json.dumps({k: v.model_dump(exclude_none=True) for k, v in sweep.space.items()}, sort_keys=True)
    sweep_run = session.recorder.sweep_run(experiment, study_name, redact_uri(storage_url), {
        "sweep.space": space[:6000], "sweep.metric": ",".join(m for m, _ in sweep.objectives),
        "sweep.direction": ",".join(d for _, d in sweep.objectives)}, parent)
    if sweep_runs is not None:
        sweep_runs.append(sweep_run)
    session.board.hide_finished = True  # a sweep's many trials: finished bars give way to the table
    searcher = OptunaSearcher(session, study, data, spec, source, sweep, n_trials or sweep.n_trials, sweep_run,
                              TrialBoard(study, sweep, session.board))
    recover(study, session.recorder, experiment, sweep_run, searcher.adopt_running())
    if sweep.scheduler is not None:
        searcher.scheduler = build_scheduler(sweep.scheduler, SchedulerContext(
            sweep, searcher.total - searcher.finished, searcher.build_spec, session.recorder, sweep_run,
            searcher.view.exploited if searcher.view is not None else None))
    session.drive(searcher)
    return _finish_sweep(searcher, session, quiet)


def _finish_sweep(searcher: OptunaSearcher, session: DriverSession, quiet: bool) -> int:
    study, sweep, tracker, sweep_run = searcher.study, searcher.sweep, session.tracker, searcher.sweep_run
    recorder = session.recorder
    console = session.console
    tracker.drain()  # the tells queued behind their trials' records are in the study
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and sweep.multi_objective:
        log_pareto_front(study, sweep, recorder, sweep_run)
    elif complete:
        best = study.best_trial
        # Another driver of the study may have logged the same step already (each step once: ARCHITECTURE 5)
        if len(trials) not in recorder.metric_steps(sweep_run, "best_value"):
            recorder.run_metrics(sweep_run, {"best_value": float(best.value or 0.0)}, len(trials))
        recorder.run_tags(sweep_run, {"best.trial_number": str(best.number),
                                      **{f"best.{k}": str(v) for k, v in best.params.items()}})
    failed_now = [t for t in trials if t.state == TrialState.FAIL and t.number in searcher.asked]
    streak = searcher.streak
    if recorder.run_owner(sweep_run) is None:  # else another driver of the study ends it
        # FAILED when the sweep stopped because its trials fail; FINISHED when it ran to its end (some trials
        # may have failed among the others: the command's exit code says so)
        recorder.end(sweep_run, "FAILED" if streak.stopped else "FINISHED",
                     f"stopped: {streak.last.strip()[-500:]}" if streak.stopped else None)
    tracker.drain()  # every queued write is in the store before the summary says where the runs are
    if not quiet:
        console.print(leaderboard(study, sweep))
    if (line := best_line(study, sweep)) is not None:
        console.print(line, highlight=False, markup=False)
    uri = redact_uri(tracker.uri)
    console.print(f"Study {shown(study.study_name)}: {len(complete)} complete, "
                  f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
                  f"{sum(t.state == TrialState.FAIL for t in trials)} failed. Runs are in {uri}; "
                  f"figures: labfleet report {shown(study.study_name)} --tracking-uri {uri}", highlight=False)
    for t in failed_now:
        console.print(f"[red]trial {t.number} failed:[/red] {shown(str(t.user_attrs.get('error', ''))[-300:])}",
                      highlight=False)
    if streak.reason:
        console.print(f"[red]stopped: {shown(streak.reason)}; no further trial was asked[/red]", highlight=False,
                      soft_wrap=True)
    elif streak.stopped:
        console.print(f"[red]stopped: {streak.count} trials in a row failed (sweep.max_consecutive_failures); "
                      f"the last: {shown(streak.last.strip()[-300:])}[/red]", highlight=False)
    return EXIT_TRIAL_FAILED if failed_now else EXIT_OK
