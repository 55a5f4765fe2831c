"""The Optuna side of a sweep: a feed of trials (ask) and a listener of their results (report, prune, tell).

The driver is the study's only ask/tell client (Optuna's heartbeat does not work with ask/tell, and
SQLite dislikes parallel writers). Each Optuna trial is a `TrialRunner`: the spec with the sampled values
at the paths of `sweep.space`, run for every seed. At each evaluation step that every seed has reached,
the mean over seeds of the first objective is reported; when the pruner says so, the searcher answers
STOP and the trial ends FINISHED, told PRUNED. A finished trial's objective is the mean over seeds of the
final value of each objective.

Crash safety: a trial is told only once its MLflow record (end states, `optuna.state` tags) is written
(`tell`). After a dead driver, `adopt_running` takes back every trial it left RUNNING whose seeds left
durable checkpoints: the same Optuna trial and the same MLflow runs go on, each seed from its checkpoint
(exactly, where the environments can be saved). `recover` undoes the rest: other RUNNING trials are told
FAIL and their parameters queued again, and the MLflow runs left RUNNING end with the trial's state.

Several drivers may work on one study at once (Optuna's parallel workers): each trial carries the identity
of the driver that asked it (`tags.DRIVER_ATTR`), a trial whose driver is alive is never adopted, failed or
ended by another, and `n_trials` counts every driver's trials, so that together they finish the study.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from labfleet.errors import SpecError, shown
from labfleet.orchestration.events import (
    DRIVER_ERROR,
    Action,
    Decision,
    Evaluation,
    Event,
    Listener,
    SeedRecord,
    Status,
    TrialEnded,
    TrialStarted,
)
from labfleet.orchestration.recorder import MlflowRecorder, RunsOwned
from labfleet.orchestration.runner import TrialMeta, TrialRunner
from labfleet.orchestration.signals import TERMINATED
from labfleet.orchestration.study import grid_size, suggest
from labfleet.orchestration.sweep_view import TrialBoard
from labfleet.spec.loading import apply_overrides, resolve_spec_data
from labfleet.spec.models import ExperimentSpec, SweepConfig
from labfleet.tracking import tags as tag
from labfleet.tracking.heartbeat import driver_gone, last_beat, slurm_start

if TYPE_CHECKING:
    from labfleet.orchestration.schedulers import Scheduler
    from labfleet.orchestration.session import DriverSession

TrialState = optuna.trial.TrialState
OBJECTIVE_PREFIX = "objective/"  # the sweep run's metric per objective, at each complete trial's number
PRUNED = "pruned"  # the reason a pruned trial's TrialEnded carries


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
    reason: str = ""  # why the sweep stopped at once (a failure every trial would repeat), if it did

    def record(self, state: TrialState, error: str | None) -> None:
        self.count = self.count + 1 if state == TrialState.FAIL else 0
        self.last = error or self.last

    def stop(self, reason: str) -> None:
        self.reason = self.last = reason

    @property
    def stopped(self) -> bool:
        return bool(self.reason) or self.count >= self.limit


class OptunaSearcher:
    """Asks the study for trials while `sweep.max_parallel` allows and `total` finished trials are not
    reached; reports, prunes and tells as their events arrive."""

    def __init__(self, session: DriverSession, study: optuna.Study, data: dict[str, Any], spec: ExperimentSpec,
                 source: str, sweep: SweepConfig, total: int, sweep_run: str, view: TrialBoard | None = None):
        self.session, self.study, self.data, self.spec, self.source = session, study, data, spec, source
        self.sweep, self.total, self.sweep_run, self.view = sweep, total, sweep_run, view
        self.recorder: MlflowRecorder = session.recorder
        self.tracker = session.tracker
        self.metric = sweep.objectives[0][0]
        self.active: dict[TrialRunner, ActiveTrial] = {}
        self.asked: set[int] = set()  # trials asked by this invocation (for the exit code)
        self.finished = finished_count(study)  # COMPLETE + PRUNED, counted here rather than read every loop
        self.finished_before = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}
        self.streak = FailureStreak(sweep.max_consecutive_failures)
        self.scheduler: Scheduler | None = None  # `sweep.scheduler`'s, when it has one (set it before `more`)
        self.continuing: list[tuple[TrialRunner, dict[int, SeedRecord]]] = []  # see `adopt_running`
        self.untold = 0  # ended trials whose tell still waits behind their records in the writer thread
        # `sweep.share_actors`: the seeds of the trials asked together share actors of up to this many seeds
        self.share_capacity = spec.resources.seeds_per_actor if sweep.share_actors else 0
        self._untold_lock = threading.Lock()  # counted up here, down in the writer thread

    # --- the feed -------------------------------------------------------------------------------
    def more(self, running: int) -> list[tuple[TrialRunner, dict[int, SeedRecord] | None]]:
        new: list[tuple[TrialRunner, dict[int, SeedRecord] | None]] = []
        # (trials a dead driver left are in `active` from `adopt_running` on, but run only once offered here)
        waiting = {id(runner) for runner, _ in self.continuing}
        running_now = sum(not r.suspended and id(r) not in waiting for r in self.active)
        if self.untold >= self.sweep.max_parallel:
            # Backpressure: when trials end faster than their records are written, the writer's queue (and
            # the trials sampled without their predecessors' results) would grow without end. At most
            # `max_parallel` ended trials go untold while new ones are asked.
            self.tracker.drain()
        while running_now < self.sweep.max_parallel:
            if self.continuing:  # trials a dead driver left, first
                new.append(self.continuing.pop(0))
                running_now += 1
                continue
            taken = self.finished + len(self.active)  # (other drivers' trials are read only when it matters)
            if taken < self.total and not (self.exhausted() or self.streak.stopped) \
                    and taken + self.others() < self.total:
                runner = self.ask()
                if runner is not None:
                    new.append((runner, None))
                    running_now += 1
                self.refresh([])
                continue
            turn = self.scheduler.next_turn() if self.scheduler is not None else None
            if turn is None:
                break
            new.append((turn, None))  # a suspended PBT member's turn
            running_now += 1
        return new

    def build_spec(self, values: dict[str, Any]) -> ExperimentSpec:
        """The spec with `values` at their paths (a sampled trial, or a PBT member's new values)."""
        spec = resolve_spec_data(apply_overrides(self.data, values), self.source, check_env=False)
        return spec.model_copy(update={"resources": spec.resources.model_copy(
            update={"max_retries": self.sweep.max_retries})})

    def ask(self) -> TrialRunner | None:
        """One new trial as a runner (not started), or None when its sampled values make a spec the
        algorithm rejects (that trial is told FAIL at once)."""
        from labfleet.orchestration.session import interrupts_deferred

        with interrupts_deferred():  # a Ctrl-C inside ask() would leave a RUNNING trial no one knows of
            trial = self.study.ask()
            self.asked.add(trial.number)
            # whose it is, for a second driver's `adopt_running`
            trial.set_user_attr(tag.DRIVER_ATTR, self.tracker.driver)
        values = {path: suggest(trial, path, p) for path, p in self.sweep.space.items()}
        if self.scheduler is not None:
            values = self.scheduler.initial(values)
        try:
            trial_spec = self.build_spec(values)
        except SpecError as exc:  # a combination of values the algorithm rejects
            trial.set_user_attr("error", str(exc))
            self.study.tell(trial, state=TrialState.FAIL)
            self.streak.record(TrialState.FAIL, str(exc))
            return None
        runner = self._runner(trial_spec, trial.number, values)
        self.active[runner] = ActiveTrial(trial, runner)
        if self.scheduler is not None:
            self.scheduler.add(runner, trial.number, values, trial)
        return runner

    def _runner(self, trial_spec: ExperimentSpec, number: int, values: dict[str, Any]) -> TrialRunner:
        meta = TrialMeta(self.sweep_run, {tag.TRIAL_NUMBER: str(number), tag.TRIAL_STATE: "RUNNING"},
                         {k: str(v) for k, v in values.items()})
        listeners: list[Listener] = [self, *([self.scheduler] if self.scheduler is not None else [])]
        return self.session.runner(trial_spec, *listeners, meta=meta, pool=self.session.pool,
                                   label=f"{self.spec.name}/trial={number}")

    def others(self) -> int:
        """Trials other drivers of the study asked since this one started, running or finished."""
        return sum(t.number not in self.asked and t.number not in self.finished_before
                   for t in self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))

    def adopt_running(self) -> set[int]:
        """Before `recover`: take back the trials a dead driver left RUNNING whose MLflow trial run is
        unfinished and whose unfinished seeds left a checkpoint. Each goes on as the same Optuna trial in
        the same runs (`more` offers them first). Returns the numbers of the trials that go on: these, and
        those another live driver is running (left to it); `recover` fails the others.
        (A PBT population is not taken back: its members re-run, as its scheduler's state is not kept.)"""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        runs = self.recorder.running_trial_runs(self.sweep_run) if running else {}
        kept = {t.number for t in running if self._live_owner(t, runs.get(t.number)) is not None}
        if self.scheduler is not None or self.sweep.scheduler is not None:
            return kept
        for frozen in running:
            if frozen.number in kept:
                continue
            values = {path: frozen.params[path] for path in self.sweep.space if path in frozen.params}
            if len(values) != len(self.sweep.space):
                continue  # killed before it sampled everything: nothing to go on with
            try:
                runner = self._runner(self.build_spec(values), frozen.number, values)
            except SpecError:
                continue
            try:
                found = self.recorder.unfinished(runner)
            except RunsOwned:  # another driver took it back a moment ago
                kept.add(frozen.number)
                continue
            for note in self.recorder.pop_notes():
                self.session.console.print(f"[yellow]{shown(note)}[/yellow]", highlight=False, soft_wrap=True)
            if found is None:
                continue
            _, records = found
            if not any(r.checkpoint for r in records.values() if r.status != Status.FINISHED):
                continue
            trial = optuna.Trial(self.study, frozen._trial_id)
            trial.set_user_attr(tag.DRIVER_ATTR, self.tracker.driver)
            self.active[runner] = ActiveTrial(trial, runner, reported=max(frozen.intermediate_values, default=-1))
            self.asked.add(frozen.number)
            self.continuing.append((runner, records))
            kept.add(frozen.number)
            resumed = sorted(seed for seed, r in records.items() if r.status != Status.FINISHED and r.checkpoint)
            self.session.console.print(f"trial {frozen.number}: continuing from checkpoints (seeds {resumed})",
                                       highlight=False)
        return kept

    def _live_owner(self, frozen: optuna.trial.FrozenTrial, run: Any) -> str | None:
        """The other live driver that runs this RUNNING trial (by the trial's `tags.DRIVER_ATTR`, else its MLflow
        trial run's driver tag; liveness as `labfleet reconcile` judges it), or None."""
        identity = frozen.user_attrs.get(tag.DRIVER_ATTR) or (run.data.tags.get(tag.DRIVER) if run else None)
        if identity == self.tracker.driver:
            return None
        if run is not None:
            beat = last_beat(run.data.tags, run.info.start_time)
        else:  # asked a moment ago (its run not yet made), or long ago by a driver that died before making it
            beat = frozen.datetime_start.timestamp() if frozen.datetime_start else 0.0
        return None if driver_gone(identity, beat) else (identity or "a driver without an identity")

    def exhausted(self) -> bool:
        """A grid is used up once every point is running or finished (Optuna's `is_exhausted` does not count
        running trials, so parallel trials would repeat points)."""
        if self.sweep.sampler.type != "grid":
            return False
        taken = {tuple(sorted(t.params.items())) for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))}
        return len(taken) >= grid_size(self.sweep)

    def refresh(self, running: list[TrialRunner]) -> None:
        if self.view is not None:
            self.view.refresh([(a.trial.number, "WAITING" if a.runner.suspended else "RUNNING", self._current(a),
                                a.latest) for a in self.active.values()])

    def _current(self, active: ActiveTrial) -> dict[str, Any]:
        """The trial's parameters as it runs now: its sampled ones, or under population-based training the
        values its last exploit gave it."""
        if self.scheduler is None:
            return active.trial.params
        values = active.runner.spec.model_dump(mode="json")
        current = {}
        for path in self.sweep.space:
            node: Any = values
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            current[path] = node
        return current

    def interrupted(self) -> None:
        """After Ctrl-C (the session ended the runs KILLED): every trial this invocation asked and did not
        finish (also one asked a moment before the signal, not yet started) is told FAIL with its
        parameters queued again."""
        with contextlib.suppress(Exception):  # the tells already queued behind their records land first
            self.tracker.drain()
        if TERMINATED.is_set() and slurm_start() is not None:
            # SLURM ends the job (requeue, preemption, scancel): the running trials stay RUNNING, as a killed
            # driver's do, and the next start adopts each one that has a checkpoint (`adopt_running`)
            self.session.console.print("[yellow]stopped by SLURM: running trials stay RUNNING; the requeued job "
                                       "(or the same command) continues them from their checkpoints[/yellow]")
            return
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number in self.asked:
                fail_and_requeue(self.study, frozen)
        self.session.console.print("[yellow]interrupted: running trials told FAIL (their parameters are queued "
                                   "again); run the same command to resume[/yellow]")

    # --- the listener ---------------------------------------------------------------------------
    def handle(self, event: Event) -> Decision | None:
        match event:
            case TrialStarted(trial=runner) if runner in self.active:
                # in the writer thread, off the driver's path (`recover` reads it only after a dead driver)
                self.recorder.after_record(self.active[runner].trial.set_user_attr, "mlflow_run_id",
                                           self.recorder.trial_run_id(runner))
            case Evaluation(trial=runner, values=values) if runner in self.active:
                active = self.active[runner]
                # your own code names its metrics only as it reports them (a built-in's are checked at
                # validation, and some evaluate an objective only at the end)
                if active.reported < 0 and runner.info.kind == "custom" \
                        and (problem := self._objective_problem(values)) is not None:
                    return self._stop_sweep(active, problem)
                return self._report(active)
            case TrialEnded(trial=runner) if runner in self.active:
                self._ended(self.active.pop(runner), event)
        return None

    def _objective_problem(self, values: dict[str, float]) -> str | None:
        """Why a trial's first evaluation cannot feed the study: it lacks an objective."""
        missing = [metric for metric, _ in self.sweep.objectives if metric not in values]
        if not missing:
            return None
        import difflib

        close = difflib.get_close_matches(missing[0], list(values), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"its first evaluation reports {', '.join(sorted(values))} but not {', '.join(map(repr, missing))}, "
                f"the sweep's objective (sweep.metric){hint}")

    def _stop_sweep(self, active: ActiveTrial, problem: str) -> Decision:
        """Fail the trial now and ask no more: every trial of this sweep would fail the same way."""
        active.error = problem
        self.streak.stop(problem)
        return Decision(Action.STOP, Status.FAILED, problem)

    def _report(self, active: ActiveTrial) -> Decision | None:
        """Report every new evaluation step, in order (the pruner sees the same sequence whether results
        come one chunk at a time or many in one). A multi-objective study takes no intermediate values
        (Optuna cannot prune it); MLflow still gets them."""
        decision = None
        for step, value in active.runner.eval_means(self.metric).items():
            if step <= active.reported:
                continue
            active.reported, active.latest = step, value
            self.recorder.trial_metrics(active.runner, {f"intermediate/{self.metric}": value}, step)
            if self.sweep.multi_objective:
                continue
            active.trial.report(value, step)
            if active.trial.should_prune():
                # pruned is a normal end (ARCHITECTURE 5): FINISHED, optuna.state=PRUNED
                decision = Decision(Action.STOP, Status.FINISHED, PRUNED)
                break
        return decision  # the values go to MLflow with the round's commit, while the trial runs

    def _ended(self, active: ActiveTrial, event: TrialEnded) -> None:
        runner, trial = active.runner, active.trial
        if event.status == Status.KILLED:  # Ctrl-C: `interrupted` tells the study
            if self.recorder.has_run(runner):  # (Ctrl-C may come while its run is being created)
                self.recorder.trial_state(runner, "FAIL", seeds=False)
            return
        if event.reason == DRIVER_ERROR:  # the driver is failing: no record can be trusted to be written
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return
        value: Any = None
        if event.reason == PRUNED:
            state, value = TrialState.PRUNED, active.latest
        elif event.status == Status.FINISHED:
            state, value = self._objective(active, event)
        else:
            state = TrialState.FAIL
            active.error = active.error or "; ".join(f"seed {seed}: {error}" for seed, error in event.errors.items()
                                                     )[-4000:] or event.reason or str(event.status)
        if state == TrialState.FAIL:
            trial.set_user_attr("error", active.error)
        self.tell(active, state, value)
        if self.view is not None:
            self.view.told(trial.number, trial.params, state, value, active.error)
        self.streak.record(state, active.error)
        self.finished += state in (TrialState.COMPLETE, TrialState.PRUNED)
        self.recorder.forget(runner)  # a long sweep's driver holds its running trials, not every one it ran

    def _objective(self, active: ActiveTrial, event: TrialEnded) -> tuple[TrialState, Any]:
        """A finished trial's state and value: the mean over its seeds of each objective's final evaluation,
        or FAIL where a seed's final evaluation lacks one (its seeds trained, but the trial cannot count: its
        run ends FAILED)."""
        values, missing = [], []
        for metric, _ in self.sweep.objectives:
            finals = [final[metric] for final in event.finals.values() if final and metric in final]
            if finals and len(finals) == len(event.finals):
                values.append(sum(finals) / len(finals))
            else:
                missing.append(metric)
        if not missing:
            return TrialState.COMPLETE, values if self.sweep.multi_objective else values[0]
        active.error = f"the trial's final evaluation has no {', '.join(map(repr, missing))}"
        self.recorder.fail_trial(active.runner, active.error)
        return TrialState.FAIL, None

    def tell(self, active: ActiveTrial, state: TrialState, value: Any = None) -> None:
        """Tell Optuna only once the trial's MLflow record (final metrics, checkpoints, end status, the
        `optuna.state` tag) is written: a driver killed in between leaves a trial that `recover` fails and
        runs again, never a COMPLETE trial whose MLflow record was lost with the writer's queue. The tell
        is queued behind those writes (the writer thread makes it), so the driver does not wait for them."""
        self.recorder.trial_state(active.runner, state.name)
        with self._untold_lock:
            self.untold += 1
        if state == TrialState.COMPLETE:
            # the sweep run's curve of the objective over trials (its chart in MLflow), one step per trial number
            values = value if isinstance(value, list) else [value]
            self.recorder.run_metrics(self.sweep_run, {f"{OBJECTIVE_PREFIX}{metric}": float(v) for (metric, _), v
                                                       in zip(self.sweep.objectives, values, strict=True)},
                                      active.trial.number)
            self.recorder.after_record(self._told, active.trial, value)
        else:
            self.recorder.after_record(self._told, active.trial, state=state)

    def _told(self, trial: optuna.Trial, *args: Any, **kwargs: Any) -> None:
        """The tell itself, in the writer thread once the trial's record is written."""
        try:
            self.study.tell(trial, *args, **kwargs)
        finally:
            with self._untold_lock:
                self.untold -= 1


def recover(study: optuna.Study, recorder: MlflowRecorder, experiment: str, sweep_run: str,
            adopted: set[int] | frozenset[int] = frozenset()) -> None:
    """Undo what a dead driver left and make MLflow agree with the study: RUNNING trials -> FAIL (parameters
    queued again); their trial runs, and every run still RUNNING under the sweep, take the trial's state as
    `optuna.state` and end (FINISHED for a COMPLETE trial, KILLED otherwise). The `adopted` trials (see
    `OptunaSearcher.adopt_running`: taken back, or another live driver's) and their runs go on instead."""
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in adopted]
    for frozen in failed:
        fail_and_requeue(study, frozen)
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    recorder.end_stale_trials(experiment, sweep_run, states, [t.user_attrs.get("mlflow_run_id", "") for t in failed],
                              keep=set(adopted))


def fail_and_requeue(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Tell an unfinished trial FAIL and queue its parameters again. A trial stopped before it sampled
    anything has no parameters to repeat: the next ask samples afresh anyway."""
    study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    if frozen.params:
        study.enqueue_trial(frozen.params, user_attrs={tag.RETRY_OF_ATTR: frozen.number})


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
