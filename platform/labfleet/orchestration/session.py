"""One command's training session: checks, Ray, the tracker, the driver loop, the summary, end states.

Order matters: every check that can reject the input (specs, tracking URI, whether the cluster can
ever hold a trial) runs before the first MLflow run is created or the first actor starts.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from labfleet.errors import Problem, SpecError
from labfleet.orchestration.progress import ProgressBoard, summary_table
from labfleet.orchestration.runner import TrialRunner, drive, unschedulable_reason
from labfleet.spec.models import ExperimentSpec, SuiteSpec
from labfleet.tracking.runs import Tracker, TrackingUnavailable
from labfleet.tracking.uri import check_tracking_uri, redact_uri, resolve_tracking_uri

EXIT_OK, EXIT_TRIAL_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Planned:
    spec: ExperimentSpec
    spec_path: Path


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as in a Ray Job), else start a local instance
    (on 127.0.0.1 when the command set `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` first; see the CLI)."""
    if ray.is_initialized():
        return
    ray.init(address=address or None, logging_level=logging.WARNING, include_dashboard=False)


def prepare(planned: list[Planned], *, source: str, tracking_uri: str, address: str | None) -> tuple[str, Tracker]:
    """Every check that can reject the input, then the tracker. Nothing is written before the last step."""
    problem = check_tracking_uri(tracking_uri)
    if problem:
        raise SpecError([Problem(source, "tracking.uri", problem)])
    connect_ray(address)
    cluster = ray.cluster_resources()
    problems = [Problem(str(p.spec_path), "resources", reason) for p in planned
                if (reason := unschedulable_reason(p.spec, cluster))]
    if problems:
        raise SpecError(problems)
    tracker = Tracker(tracking_uri)  # the first write: a SQLite store is created here
    try:
        tracker.check()
    except TrackingUnavailable as exc:
        raise SpecError([Problem(source, "tracking.uri", str(exc))]) from None
    return tracking_uri, tracker


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM handler: stop the way Ctrl-C stops (every open run ends KILLED)."""
    raise KeyboardInterrupt(f"signal {signum}")


def execute(planned: list[Planned], *, source: str, cli_tracking_uri: str | None, address: str | None,
            console: Console, quiet: bool = False, suite: SuiteSpec | None = None) -> int:
    """Train every planned spec (under one `suite` run when `suite` is given); returns the exit code."""
    spec_uri = suite.tracking.uri if suite else planned[0].spec.tracking.uri
    uri, tracker = prepare(planned, source=source, tracking_uri=resolve_tracking_uri(cli_tracking_uri, spec_uri),
                           address=address)

    previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    runners: list[TrialRunner] = []
    suite_run_id = None
    try:
        with ProgressBoard(console, quiet) as board:
            if suite is not None:
                suite_run_id = tracker.start_run(suite.tracking.experiment or suite.name, "suite", suite.name,
                                                 tags={"labfleet.suite": suite.name})
            for plan in planned:
                experiment = (suite.tracking.experiment or suite.name) if suite else None
                spec = plan.spec
                if experiment:  # nested runs show under their parent only within one experiment
                    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
                        update={"experiment": experiment})})
                runner = TrialRunner(spec, tracker, parent_run_id=suite_run_id, spec_dir=plan.spec_path.parent,
                                     progress=board, trial_tags={"labfleet.spec_file": str(plan.spec_path)})
                runners.append(runner)
                runner.start()
            drive(runners)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        for runner in runners:
            runner.abort("KILLED")
        tracker.close_open_runs("KILLED")
        console.print("[yellow]interrupted: every open run was marked KILLED[/yellow]")
        return EXIT_INTERRUPTED
    except BaseException as exc:
        for runner in runners:
            runner.abort("FAILED")
        tracker.close_open_runs("FAILED", f"driver error: {type(exc).__name__}: {exc}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)

    failed = [r for r in runners if r.status != "FINISHED"]
    if suite_run_id is not None:
        error = "; ".join(f"{r.label}: {r.status}" for r in failed)
        tracker.end_run(suite_run_id, "FAILED" if failed else "FINISHED", error or None)
    _print_summary(console, runners, uri, quiet)
    return EXIT_TRIAL_FAILED if failed else EXIT_OK


def _print_summary(console: Console, runners: list[TrialRunner], uri: str, quiet: bool) -> None:
    rows = []
    for runner in runners:
        metric = runner.info.primary_metric
        for state in runner.seeds.values():
            value = (state.final or {}).get(metric)
            rows.append({"trial": runner.label, "seed": str(state.seed), "status": state.status,
                         "steps": str(state.progress), metric: "" if value is None else f"{value:.4g}",
                         "time": f"{state.elapsed:.0f}s"})
    if not quiet:
        console.print(summary_table("labfleet results", rows))
    for runner in runners:
        for state in runner.seeds.values():
            if state.error:
                console.print(f"[red]{runner.label} seed {state.seed} failed:[/red] "
                              f"{state.error.strip().splitlines()[-1][:500]}", highlight=False)
    shown = redact_uri(uri)
    console.print(f"Runs are in {shown} (experiment: {runners[0].experiment if runners else '-'}). "
                  f"Open them with: mlflow ui --backend-store-uri {shown} --host 127.0.0.1", highlight=False)
