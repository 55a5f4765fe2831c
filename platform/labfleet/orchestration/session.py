"""One command's training session: checks, Ray, the tracker, the driver loop, the summary, end states.

Order matters: every check that can reject the input (specs, tracking URI, whether the cluster can
ever hold a trial) runs before the first MLflow run is created or the first actor starts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from labfleet.errors import Problem, SpecError
from labfleet.orchestration.progress import ProgressBoard, summary_table
from labfleet.orchestration.runner import TrialRunner, config_hash, drive, unschedulable_reason
from labfleet.spec.models import ExperimentSpec, SuiteSpec
from labfleet.tracking.resume import LABEL_TAG, find_unfinished_trial, seed_records
from labfleet.tracking.runs import Tracker, TrackingUnavailable
from labfleet.tracking.uri import DEFAULT_TRACKING_URI, check_tracking_uri, redact_uri, resolve_tracking_uri

EXIT_OK, EXIT_TRIAL_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Planned:
    spec: ExperimentSpec
    spec_path: Path
    sweep_data: dict[str, Any] | None = None  # a suite entry run as a sweep: its spec data with overrides


def address_problem(target: str, timeout: float = 5.0) -> str | None:
    """Why a Ray address cannot be reached (a TCP connect within `timeout` seconds), or None. Ray itself
    retries an unreachable GCS for minutes; a user who mistyped the address should know in seconds."""
    if target in ("local", "auto"):
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(target if "://" in target else f"ray://{target}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        return f"expected HOST:PORT (the head's GCS, e.g. 127.0.0.1:6379) or ray://HOST:PORT, got {target!r}"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"no Ray cluster answers at {host}:{port} within {timeout:g} s ({exc.strerror or exc})"
    return None


def connect_ray(address: str | None, code_dirs: list[str] | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as in a Ray Job), else start a local instance
    (on 127.0.0.1 when the command set `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` first; see the CLI)."""
    if ray.is_initialized():
        return
    # "local": a new instance even when a `ray start` cluster runs on this machine (plain ray.init() would
    # join it); $RAY_ADDRESS (set inside a Ray Job) still wins over "local".
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    problem = address_problem(target)
    if problem:
        raise SpecError([Problem("--address" if address else "$RAY_ADDRESS", "", problem)])
    verbose = bool(os.environ.get("LABFLEET_VERBOSE"))
    # Workers import users' own modules (env and algorithm import paths) from the specs' directories, as
    # the driver does; a submitted job ships its working directory instead.
    paths = [str(Path(d).resolve()) for d in code_dirs or []] + [os.getcwd()]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        dict.fromkeys(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))}}
    ray.init(address=target, logging_level=logging.WARNING if verbose else logging.ERROR, include_dashboard=False,
             runtime_env=runtime_env if target == "local" else None)


def prepare(planned: list[Planned], *, source: str, tracking_uri: str, address: str | None) -> tuple[str, Tracker]:
    """Every check that can reject the input, then the tracker. Nothing is written before the last step."""
    problem = check_tracking_uri(tracking_uri)
    if problem:
        raise SpecError([Problem(source, "tracking.uri", problem)])
    connect_ray(address, [str(p.spec_path.parent) for p in planned])
    cluster = ray.cluster_resources()
    problems = [Problem(str(p.spec_path), "resources", reason) for p in planned
                if (reason := unschedulable_reason(p.spec, cluster))]
    if problems:
        raise SpecError(problems)
    tracker = Tracker(tracking_uri, background=True)  # the first write: a SQLite store is created here
    try:
        tracker.check()
    except TrackingUnavailable as exc:
        raise SpecError([Problem(source, "tracking.uri", str(exc))]) from None
    return tracking_uri, tracker


TERMINATED = threading.Event()  # set by SIGTERM: the command exits without touching Ray again


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM handler: stop the way Ctrl-C stops (every open run ends KILLED)."""
    TERMINATED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def release_after_interrupt(runners: list[TrialRunner]) -> None:
    """After the end states are recorded: free the runners' actors, unless a SIGTERM (which a local Ray's
    processes received too) ended the command; then the actors die with this driver, their owner."""
    if TERMINATED.is_set():
        return
    for runner in runners:
        runner.release()


def ignore_interrupts() -> None:
    """From here on Ctrl-C and SIGTERM are ignored: the cleanup after the first one runs to its end."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is over, then raise KeyboardInterrupt: for a few lines
    that must not be cut in two, such as creating an Optuna trial and recording that this driver owns it
    (cut between the two, the trial would be left RUNNING with nobody to end it)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        raise KeyboardInterrupt(f"signal {held[0]}")


def execute(planned: list[Planned], *, source: str, cli_tracking_uri: str | None, address: str | None,
            console: Console, quiet: bool = False, suite: SuiteSpec | None = None, fresh: bool = False) -> int:
    """Train every planned spec (under one `suite` run when `suite` is given); returns the exit code."""
    spec_uri = suite.tracking.uri if suite else planned[0].spec.tracking.uri
    uri, tracker = prepare(planned, source=source, tracking_uri=resolve_tracking_uri(cli_tracking_uri, spec_uri),
                           address=address)

    previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    runners: list[TrialRunner] = []
    suite_run_id = None
    sweep_codes: list[int] = []
    experiment = (suite.tracking.experiment or suite.name) if suite else None
    try:
        with ProgressBoard(console, quiet) as board:
            done: set[tuple[str, str]] = set()
            if suite is not None:
                assert experiment is not None
                suite_run_id, done = _suite_run(tracker, experiment, suite.name, fresh)
            runners += _start_runners(planned, tracker, board, suite_run_id, experiment, done, console, fresh)
            drive(runners)
        sweep_codes = _run_sweeps(planned, tracker, suite_run_id, experiment, address, console, quiet)
    except KeyboardInterrupt:
        ignore_interrupts()  # a second Ctrl-C must not cut the cleanup short
        for runner in runners:
            runner.abort("KILLED", release=False)
        tracker.close_open_runs("KILLED")
        console.print("[yellow]interrupted: every open run was marked KILLED[/yellow]")
        release_after_interrupt(runners)
        return EXIT_INTERRUPTED
    except BaseException as exc:
        for runner in runners:
            runner.abort("FAILED")
        tracker.close_open_runs("FAILED", f"driver error: {type(exc).__name__}: {exc}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)

    if EXIT_INTERRUPTED in sweep_codes:
        tracker.close_open_runs("KILLED")
        return EXIT_INTERRUPTED
    failed = [r for r in runners if r.status != "FINISHED"]
    failed_sweeps = sum(code != EXIT_OK for code in sweep_codes)
    if suite_run_id is not None:
        error = "; ".join([f"{r.label}: {r.status}" for r in failed] + [f"{failed_sweeps} sweep(s) with failed trials"]
                          * bool(failed_sweeps))
        tracker.end_run(suite_run_id, "FAILED" if failed or failed_sweeps else "FINISHED", error or None)
    tracker.close()  # every queued write is in the store before the summary says where the runs are
    target = suite.name if suite else (runners[0].experiment if runners else "")
    _print_summary(console, runners, uri, quiet, target)
    return EXIT_TRIAL_FAILED if failed or failed_sweeps else EXIT_OK


def _start_runners(planned: list[Planned], tracker: Tracker, board: ProgressBoard, suite_run_id: str | None,
                   experiment: str | None, done: set[tuple[str, str]], console: Console,
                   fresh: bool = False) -> list[TrialRunner]:
    """A runner per planned spec; one whose last invocation a dead or interrupted driver left unfinished
    continues it (the same runs, each unfinished seed from its last checkpoint) unless `fresh`."""
    runners = []
    for plan in planned:
        if plan.sweep_data is not None:
            continue
        if (plan.spec.name, config_hash(plan.spec)) in done:
            console.print(f"{plan.spec.name}: finished in the interrupted run of this suite, skipped", highlight=False)
            continue
        spec = plan.spec
        if experiment:  # nested runs show under their parent only within one experiment
            spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"experiment": experiment})})
        runner = TrialRunner(spec, tracker, parent_run_id=suite_run_id, spec_dir=plan.spec_path.parent,
                             progress=board, trial_tags={"labfleet.spec_file": str(plan.spec_path)})
        runners.append(runner)
        experiment_id = tracker.experiment_id(runner.experiment)
        unfinished = None if fresh else find_unfinished_trial(tracker.client, experiment_id, runner.label,
                                                              config_hash(spec), spec.seeds, suite_run_id)
        if unfinished is None:
            runner.start()
            continue
        records = seed_records(tracker.client, experiment_id, unfinished.info.run_id)
        resumed = sorted(seed for seed, r in records.items() if r.status != "FINISHED" and r.checkpoint)
        console.print(f"{runner.label}: continuing trial run {unfinished.info.run_id} ({unfinished.info.status}); "
                      f"from checkpoints: seeds {resumed or 'none'} (--fresh starts new runs)", highlight=False)
        runner.resume(unfinished, records)
    return runners


def _run_sweeps(planned: list[Planned], tracker: Tracker, suite_run_id: str | None, experiment: str | None,
                address: str | None, console: Console, quiet: bool) -> list[int]:
    """A suite's sweep entries, one after another, after its other entries; each resumes its study."""
    from labfleet.orchestration.sweep import execute_sweep

    codes: list[int] = []
    for plan in planned:
        if plan.sweep_data is None:
            continue
        codes.append(execute_sweep(plan.sweep_data, plan.spec, plan.spec_path, storage=None, n_trials=None,
                                   cli_tracking_uri=tracker.uri, address=address, console=console, quiet=quiet,
                                   attach=(tracker, suite_run_id, experiment or plan.spec.name)))
        if codes[-1] == EXIT_INTERRUPTED:
            break
    return codes


def _suite_run(tracker: Tracker, experiment: str, name: str, fresh: bool = False) -> tuple[str, set[tuple[str, str]]]:
    """The suite run: the latest one of this name when it did not finish (an interrupted suite resumes:
    its FINISHED trials are skipped, the others continue), else (or when `fresh`) a new one."""
    client = tracker.client
    experiment_id = tracker.experiment_id(experiment)
    found = client.search_runs([experiment_id], f"tags.`labfleet.role` = 'suite' and tags.`labfleet.suite` = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if fresh or not found or found[0].info.status == "FINISHED":
        return tracker.start_run(experiment, "suite", name, tags={"labfleet.suite": name}), set()
    run_id = found[0].info.run_id
    tracker.reopen_run(run_id, "suite")
    done: set[tuple[str, str]] = set()
    for trial in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000):
        if trial.data.tags.get("labfleet.role") != "trial":
            continue
        if trial.info.status == "FINISHED":
            label = trial.data.tags.get(LABEL_TAG, trial.data.tags.get("mlflow.runName", ""))
            done.add((label, trial.data.tags.get("labfleet.config_hash", "")))
        stale = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}' "
                                                    f"and attributes.status = 'RUNNING'")
        for run in [*stale, *([trial] if trial.info.status == "RUNNING" else [])]:
            tracker.end_run(run.info.run_id, "KILLED")
    return run_id, done


def _print_summary(console: Console, runners: list[TrialRunner], uri: str, quiet: bool,
                   report_target: str = "") -> None:
    rows = []
    for runner in runners:
        for state in runner.seeds.values():
            metric = runner.info.primary_metric or next(iter(sorted(state.final or {})), "")
            value = (state.final or {}).get(metric)
            rows.append({"trial": runner.run_name, "seed": str(state.seed), "status": state.status,
                         "steps": str(state.progress), "metric": metric,
                         "value": "" if value is None else f"{value:.4g}", "time": f"{state.elapsed:.0f}s"})
    if not quiet:
        console.print(summary_table("labfleet results", rows))
    for runner in runners:
        for state in runner.seeds.values():
            if state.error:
                console.print(f"[red]{runner.label} seed {state.seed} failed:[/red] "
                              f"{state.error.strip().splitlines()[-1][:500]}", highlight=False)
    shown = redact_uri(uri)
    flag = "" if uri == DEFAULT_TRACKING_URI else f" --tracking-uri {shown}"
    where = f"Open them at {shown}" if uri.startswith(("http://", "https://")) else (
        f"Open them with: labfleet ui{flag}  (or: mlflow ui --backend-store-uri {shown} --host 127.0.0.1)")
    console.print(f"Runs are in {shown} (experiment: {runners[0].experiment if runners else '-'}). {where}. "
                  f"Compare them with: labfleet report {report_target}{flag}", highlight=False)
