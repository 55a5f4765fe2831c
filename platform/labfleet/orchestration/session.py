"""One command's driver session: the checks, Ray, and the loop that drives trials to their end states.

Order matters: every check that can reject the input (specs, tracking URI, whether the cluster can
ever hold a trial) runs before the first MLflow run is created or the first actor starts (`prepare`).

`DriverSession` is shared by `run`, `suite` and `sweep` (commands.py composes them): it owns the
listeners every trial gets (the MLflow recorder, the progress bars), the actor pool, the signals, and
the end state of every run when something goes wrong. `drive(feed)` starts the trials a feed offers while
there is room (all at once for `run` and `suite`; one Optuna ask at a time for a sweep) and polls every
running trial through one wait, until the feed has nothing more and every trial has ended.

Ctrl-C or SIGTERM anywhere inside the session: every unfinished seed and trial ends KILLED (the records
first, without touching Ray), each feed undoes its part (a sweep tells its trials FAIL and queues their
parameters again), every other open run ends KILLED, and the command exits 130. Any other exception
ends them FAILED with the error and propagates.
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
from typing import Any, Protocol

from rich.console import Console

from labfleet.errors import Problem, SpecError, shown
from labfleet.orchestration.backend import Backend, InProcessBackend, in_process_problem
from labfleet.orchestration.events import DRIVER_ERROR, Listener, SeedRecord, Status
from labfleet.orchestration.progress import ProgressBoard, ProgressListener
from labfleet.orchestration.recorder import MlflowRecorder
from labfleet.orchestration.runner import (
    ActorPool,
    TrialRunner,
    drive_once,
    ray_backend,
    stall_warnings,
    start_shared,
    trial_bundles,
    unschedulable_reason,
)
from labfleet.orchestration.signals import INTERRUPTED, TERMINATED, check_interrupted, ctrl_c, raise_interrupt
from labfleet.orchestration.tensorboard import TensorBoardListener
from labfleet.spec.models import ExperimentSpec
from labfleet.tracking.runs import Tracker, TrackingUnavailable
from labfleet.tracking.uri import check_tracking_uri, redact_uri
from labfleet.usercode import CODE_DIRS_ENV, code_dirs

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
    import ray

    if ray.is_initialized():
        return
    # "local": a new instance even when a `ray start` cluster runs on this machine (plain ray.init() would
    # join it); $RAY_ADDRESS (set inside a Ray Job) still wins over "local".
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    problem = address_problem(target)
    if problem:
        raise SpecError([Problem("--address" if address else "$RAY_ADDRESS", "", problem)])
    verbose = bool(os.environ.get("LABFLEET_VERBOSE"))
    if target == "local":
        # The path goes into the environment the local instance's processes inherit, not into a runtime_env:
        # workers of a job with a runtime_env cannot be the ones Ray starts ahead, so each trial actor would
        # wait for a new process (measured: an actor's first call 1.25 s after creation with one, 0.43 s
        # without).
        share_code_dirs(code_dirs or [])
    try:
        ray.init(address=target, logging_level=logging.WARNING if verbose else logging.ERROR, include_dashboard=False)
    except SystemExit as exc:  # Ray's own SIGTERM handler, installed early in `ray.init`, exits with the signal
        if exc.code != signal.SIGTERM:
            raise
        TERMINATED.set()
        raise KeyboardInterrupt(f"signal {signal.SIGTERM}") from None
    if threading.current_thread() is threading.main_thread():
        # Ray's driver installs a SIGTERM handler that exits on the spot, leaving a local instance's agents
        # running; from here on a SIGTERM stops this command as Ctrl-C does (see `raise_interrupt`).
        signal.signal(signal.SIGTERM, raise_interrupt)


def share_code_dirs(paths: list[str]) -> None:
    """Trial workers import users' own modules (env and algorithm import paths) from the directories the specs'
    import paths were found in (`labfleet.usercode.code_dirs`), as the driver does: a local Ray instance's
    processes inherit them through the environment, and so do in-process workers. A submitted job ships its
    working directory instead."""
    resolved = [str(Path(d).resolve()) for d in paths]
    os.environ[CODE_DIRS_ENV] = os.pathsep.join(resolved)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(resolved + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def prepare(planned: list[Planned], *, source: str, tracking_uri: str, address: str | None,
            console: Console | None = None, in_process: bool = False) -> tuple[str, Tracker, Backend]:
    """Every check that can reject the input, then the tracker and where the trials run (a Ray cluster, or
    with `in_process` this process). Nothing is written before the last step. With a `console`, what is
    starting is said as it starts (Ray takes seconds)."""
    problem = check_tracking_uri(tracking_uri)
    if problem:
        raise SpecError([Problem(source, "tracking.uri", problem)])
    dirs, clashes = code_dirs((p.spec, p.spec_path.parent) for p in planned)
    if clashes:
        raise SpecError([Problem(source, "", clash) for clash in clashes])
    backend = (_in_process(planned, address, dirs, tracking_uri, console) if in_process
               else _on_ray(planned, address, dirs, tracking_uri, console))
    try:
        tracker = Tracker(tracking_uri, background=True)  # the first write: a SQLite store is created here
    except Exception as exc:  # noqa: BLE001 - MLflow's store failed to open or to migrate (a full disk, say)
        raise SpecError([Problem(source, "tracking.uri", f"the MLflow store {redact_uri(tracking_uri)} cannot be "
                                 f"opened: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")]) from None
    try:
        tracker.check()
    except TrackingUnavailable as exc:
        tracker.close()
        raise SpecError([Problem(source, "tracking.uri", str(exc))]) from None
    return tracking_uri, tracker, backend


def _on_ray(planned: list[Planned], address: str | None, dirs: list[str], tracking_uri: str,
            console: Console | None) -> Backend:
    import ray

    if console is not None and not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        console.print(f"[dim]starting Ray: {f'joining {target}' if target else 'a local instance on 127.0.0.1'}"
                      f"; runs go to {shown(redact_uri(tracking_uri))}[/dim]", highlight=False, soft_wrap=True)
    connect_ray(address, dirs)
    cluster = ray.cluster_resources()
    problems = [Problem(str(p.spec_path), "resources", reason) for p in planned
                if (reason := unschedulable_reason(p.spec, cluster))]
    if problems:
        raise SpecError(problems)
    return ray_backend()


def _in_process(planned: list[Planned], address: str | None, dirs: list[str], tracking_uri: str,
                console: Console | None) -> Backend:
    """`--in-process`: every trial in this process, one chunk at a time (no Ray instance starts)."""
    problems = [Problem(str(p.spec_path), "resources", reason) for p in planned
                if (reason := in_process_problem(trial_bundles(p.spec)))]
    if address:
        problems.append(Problem("--address", "", "--in-process trains in this process and joins no Ray cluster: "
                                "give one of the two"))
    if problems:
        raise SpecError(problems)
    share_code_dirs(dirs)
    if console is not None:
        console.print(f"[dim]training in this process (no Ray); runs go to {shown(redact_uri(tracking_uri))}[/dim]",
                      highlight=False, soft_wrap=True)
    return InProcessBackend()


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

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)
        INTERRUPTED.set()

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        raise KeyboardInterrupt(f"signal {held[0]}")


class Feed(Protocol):
    """Where a drive's trials come from. `more(running)` returns the trials to start now (each with the
    records of an earlier driver's seeds to resume, or None) given how many of this feed's trials run;
    `interrupted()` undoes the feed's part after Ctrl-C (the runs are already KILLED)."""

    def more(self, running: int) -> list[tuple[TrialRunner, dict[int, SeedRecord] | None]]: ...

    def refresh(self, running: list[TrialRunner]) -> None: ...

    def interrupted(self) -> None: ...

    # > 0: the seeds of new trials started together share actors of up to this many seeds (`start_shared`)
    share_capacity: int


class FixedFeed:
    """A fixed list of trials, all started at once (`run`, `suite`)."""

    share_capacity = 0

    def __init__(self, trials: list[tuple[TrialRunner, dict[int, SeedRecord] | None]]):
        self.trials = list(trials)

    def more(self, running: int) -> list[tuple[TrialRunner, dict[int, SeedRecord] | None]]:
        trials, self.trials = self.trials, []
        return trials

    def refresh(self, running: list[TrialRunner]) -> None:
        return None

    def interrupted(self) -> None:
        return None


class DriverSession:
    def __init__(self, tracker: Tracker, console: Console, quiet: bool = False, hide_finished: bool = False,
                 tensorboard: Path | None = None, backend: Backend | None = None):
        self.tracker = tracker
        self.console = console
        self.recorder = MlflowRecorder(tracker)
        # `--tensorboard DIR`: the seeds' metrics as event files too, after the recorder named their runs
        self.tensorboard = TensorBoardListener(tensorboard, self.recorder.run_name) if tensorboard else None
        self.board = ProgressBoard(console, quiet, hide_finished=hide_finished)
        self.pool = ActorPool(backend)  # trial actors are reused across trials of the same shape
        self.runners: list[TrialRunner] = []  # the trials this session started that have not ended
        self.feeds: list[Feed] = []
        self.interrupted = False
        self._previous_term: Any = None
        self._previous_int: Any = None

    def listeners(self, *extra: Listener) -> list[Listener]:
        """What every trial of this session tells: the record first (a scheduler's decision, or the
        study's `tell`, comes after the run it concerns is written), the TensorBoard files, then the bars,
        then `extra`."""
        mirrors: list[Listener] = [self.tensorboard] if self.tensorboard else []
        return [self.recorder, *mirrors, ProgressListener(self.board), *extra]

    def runner(self, spec: ExperimentSpec, *extra: Listener, **kwargs: Any) -> TrialRunner:
        kwargs.setdefault("backend", self.pool.backend)
        return TrialRunner(spec, self.listeners(*extra), **kwargs)

    def __enter__(self) -> DriverSession:
        INTERRUPTED.clear()
        self._previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
        self._previous_int = signal.signal(signal.SIGINT, ctrl_c)
        self.board.__enter__()
        return self

    def drive(self, feed: Feed, poll_seconds: float = 0.5) -> None:
        """Run the feed's trials to their end states, starting new ones while the feed offers them."""
        self.feeds.append(feed)
        active: list[TrialRunner] = []
        while True:
            check_interrupted()  # (a signal whose KeyboardInterrupt was swallowed where it landed)
            started = feed.more(len(active))
            active += self._start(started, feed.share_capacity)
            active = [r for r in active if not (r.done or r.suspended)]
            if started:  # ended trials need no cleanup on Ctrl-C: a long sweep's driver keeps only the others
                self.runners = [r for r in self.runners if not r.done]
            feed.refresh(active)
            if not active and not started:
                return
            if active:
                drive_once(active, poll_seconds)
                self.tracker.commit()  # the round's metrics, tags and ended runs, a store call per run
                for line in stall_warnings(active):
                    self.console.print(f"[yellow]{shown(line)}[/yellow]", highlight=False, soft_wrap=True)

    def _start(self, started: list[tuple[TrialRunner, dict[int, SeedRecord] | None]], share_capacity: int
               ) -> list[TrialRunner]:
        """Start (or resume, or give their turn to) the trials a feed offers; they are now active."""
        together = []  # new trials whose seeds share actors
        for runner, records in started:
            if runner.suspended:  # its turn again (PBT)
                runner.unsuspend()
                continue
            self.runners.append(runner)
            if records is None and share_capacity > 0:
                together.append(runner)
            elif records is None:
                runner.start()
            else:
                runner.resume(records)
        if together:
            start_shared(together, share_capacity)
        return [runner for runner, _ in started]

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        try:
            self.board.__exit__(None, None, None)
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                ignore_interrupts()  # a second Ctrl-C must not cut the cleanup short
                for runner in self.runners:  # the records first; Ray may be gone (see TrialRunner.stop)
                    runner.stop(Status.KILLED, release=False)
                for feed in self.feeds:
                    feed.interrupted()
                self.tracker.close_open_runs("KILLED")
                release_after_interrupt(self.runners)
                self.interrupted = True
                return True
            if exc is not None:
                for runner in self.runners:
                    runner.stop(Status.FAILED, DRIVER_ERROR)
                self.tracker.close_open_runs("FAILED", f"driver error: {type(exc).__name__}: {exc}")
            return False
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            signal.signal(signal.SIGTERM, self._previous_term)
            signal.signal(signal.SIGINT, self._previous_int)
            if not TERMINATED.is_set():  # after a SIGTERM the idle actors die with this driver
                self.pool.shutdown()
