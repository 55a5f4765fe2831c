"""The execution side of the driver: trial actors, placement groups, retries, the actor pool.

`TrialRunner` drives one configuration (a trial): its seeds' logical states and what their results mean.
Each seed trains in a `Unit`: one actor (a seed alone, or several seeds together) with its placement group,
its call in flight and its retries, reached through a backend (backend.py): Ray actors, or workers in the
driver's own process. Each unit's actors are reserved together as one placement group, so parallel trials
cannot deadlock on partial reservations. `drive()` polls any number of runners through one wait, so a
suite's trials share the cluster. A seed whose actor dies (or a worker it calls, or the node holding its
last result) is restarted from its last checkpoint up to `resources.max_retries` times; a seed whose
trainer raises fails.

The runner writes nothing and draws nothing: it emits typed events (events.py) to its listeners, which
keep the record (recorder.py), the progress bars, the study and the schedulers, and which may answer a
result with a decision (stop, pause). A paused trial can be retargeted (another trial's checkpoints and a
new spec: PBT's exploit) or suspended (its actors freed until its turn comes again).

With an `ActorPool` (sweeps use one), a seed that finishes hands its idle actor and placement group to
the pool, and the next seed of the same shape loads its trial into them instead of starting a process:
creating an actor costs about a second, far more than a short trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.orchestration.backend import Backend, RayBackend, total
from labfleet.orchestration.events import (
    CONTINUE,
    Action,
    ChunkResult,
    Decision,
    Evaluation,
    Event,
    Listener,
    SeedEnded,
    SeedPaused,
    SeedPlaced,
    SeedRecord,
    SeedRestored,
    SeedRetried,
    SeedStarted,
    Status,
    TrialEnded,
    TrialMeta,
    TrialStarted,
)
from labfleet.orchestration.trial import TrialWorker, TrialWorkerGroup
from labfleet.orchestration.wire import SeedChunk, SeedFailed
from labfleet.spec.models import ExperimentSpec

PlacementGroup = Any  # what the backend's `reserve` returned
_DEFAULT: list[Backend] = []


def ray_backend() -> Backend:
    """The backend of runners made without one: Ray (made once)."""
    if not _DEFAULT:
        _DEFAULT.append(RayBackend())
    return _DEFAULT[0]


def config_hash(spec: ExperimentSpec) -> str:
    """Identifies a configuration: the resolved spec without its seeds and tracking location."""
    data = spec.model_dump(mode="json", exclude={"seeds", "tracking", "description"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def trial_bundles(spec: ExperimentSpec) -> list[dict[str, float]]:
    """The placement group of one seed: its trial actor (data-parallel rank 0), the other data-parallel
    ranks, then one bundle per rollout worker."""
    res = spec.resources
    gpus = res.gpus_per_trial / res.data_parallel
    rank = {"CPU": res.cpus_per_trial, **({"GPU": gpus} if gpus else {})}
    return [dict(rank) for _ in range(res.data_parallel)] + [{"CPU": res.cpus_per_worker}] * res.rollout_workers


def unschedulable_reason(spec: ExperimentSpec, cluster: dict[str, float]) -> str | None:
    """Why no node of this cluster could ever hold one seed's placement group, or None."""
    for key, value in total(trial_bundles(spec)).items():
        if value > cluster.get(key, 0.0) + 1e-9:
            return (f"one trial needs {value:g} {key} (resources: cpus_per_trial, cpus_per_worker x "
                    f"rollout_workers, gpus_per_trial) but the Ray cluster has {cluster.get(key, 0.0):g}")
    return None


@dataclass
class Host:
    """A trial actor with its placement group, and where it runs."""

    actor: Any
    group: PlacementGroup
    where: dict[str, str] | None = None


def _bundles_key(spec: ExperimentSpec) -> str:
    res = spec.resources
    # (an actor of seeds_per_actor > 1 is another class, with another load protocol: never reused for 1)
    return json.dumps([trial_bundles(spec), res.cpus_per_trial, res.gpus_per_trial, res.seeds_per_actor > 1])


class ActorPool:
    """Idle trial actors, by the shape of their placement group. Taking a host of one shape first frees
    the idle hosts of other shapes, so that idle actors never hold resources a new trial needs.

    A seed whose new placement group is not placed yet waits (`wait`). An actor that comes back while a
    seed's reservation is unplaced and cannot be placed with the cluster's free resources goes straight
    to that seed when their shapes match (the seed's reservation is dropped), and is freed otherwise: an
    idle actor never holds what a waiting seed needs (with more seeds than the cluster holds at once,
    that would deadlock). Otherwise it is kept for the next trial, as the waiting seed's own actor starts."""

    def __init__(self, backend: Backend | None = None) -> None:
        self.backend = backend or ray_backend()
        self.idle: dict[str, list[Host]] = {}
        self.waiting: dict[int, tuple[TrialRunner, SeedState]] = {}  # in launch order
        self.reused = 0

    def take(self, spec: ExperimentSpec) -> Host | None:
        key = _bundles_key(spec)
        for other in [k for k in self.idle if k != key]:
            for host in self.idle.pop(other):
                self.backend.free(host.actor, host.group)
        hosts = self.idle.get(key)
        if not hosts:
            return None
        self.reused += 1
        return hosts.pop()

    def put(self, spec: ExperimentSpec, host: Host) -> None:
        key = _bundles_key(spec)
        for ident, (_, state) in list(self.waiting.items()):
            if state.group is None or self.backend.placed(state.group):  # its reservation is made
                del self.waiting[ident]
        starved = [(ident, runner, state) for ident, (runner, state) in self.waiting.items()
                   if not self.backend.fits(trial_bundles(runner.spec))]  # not while this idle actor holds its share
        for ident, runner, state in starved:
            if _bundles_key(runner.spec) == key:
                del self.waiting[ident]
                self.reused += 1
                runner.adopt(state, host)
                return
        if starved:
            self.backend.free(host.actor, host.group)
            return
        self.idle.setdefault(key, []).append(host)

    def wait(self, runner: TrialRunner, state: SeedState) -> None:
        self.waiting[id(state)] = (runner, state)

    def placed(self, state: SeedState) -> None:
        self.waiting.pop(id(state), None)

    def shutdown(self) -> None:
        for hosts in self.idle.values():
            for host in hosts:
                self.backend.free(host.actor, host.group)
        self.idle.clear()
        self.waiting.clear()


@dataclass
class SeedState:
    seed: int
    status: Status = Status.PENDING  # PENDING -> RUNNING -> FINISHED | FAILED | KILLED
    unit: Unit | None = None  # the actor that trains it (alone, or with other seeds), while it has one
    checkpoint: bytes | None = None
    progress: int = 0
    latest: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] | None = None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # metric step -> eval/* values
    logged: dict[str, int] = field(default_factory=dict)  # metric -> the last step delivered (exactly once)
    retries: int = 0
    placed: bool = False  # the current actor's node was announced
    where: dict[str, str] | None = None  # the current actor's node, host and device
    paused: bool = False  # held by a scheduler: no chunk in flight until `resume_seed`
    reload: bool = False  # on resume, load `checkpoint` with the trial's (new) spec first
    error: str | None = None
    busy: float = 0.0  # seconds its actor spent training it (not waiting for resources, nor starting)
    moved: float = field(default_factory=time.perf_counter)  # when it last made progress, or was (re)launched
    stall_warned: bool = False  # the driver said it makes no progress (`resources.stall_warning_s`)

    @property
    def actor(self) -> Any:
        return self.unit.actor if self.unit is not None else None

    @property
    def group(self) -> PlacementGroup | None:
        return self.unit.group if self.unit is not None else None

    @property
    def future(self) -> Any:
        return self.unit.future if self.unit is not None else None

    @property
    def shared(self) -> Unit | None:
        """With seeds_per_actor > 1 or shared actors: the unit whose actor it shares with other seeds."""
        return self.unit if self.unit is not None and self.unit.grouped else None


def stall_warnings(runners: list[TrialRunner], now: float | None = None) -> list[str]:
    """One sentence for each running seed that has made no progress for `resources.stall_warning_s`
    seconds (said once until it moves again)."""
    now = time.perf_counter() if now is None else now
    lines = []
    for runner in runners:
        limit = runner.spec.resources.stall_warning_s
        for state in runner.seeds.values():
            if not limit or state.status != Status.RUNNING or state.paused or state.stall_warned \
                    or now - state.moved < limit:
                continue
            state.stall_warned = True
            if state.placed:
                lines.append(f"{runner.label} seed {state.seed}: no progress for {limit:g} s (at step "
                             f"{state.progress}): its code or environment may hang. What it reported is logged; "
                             "Ctrl-C stops it (resources.stall_warning_s sets this warning)")
            else:
                lines.append(f"{runner.label} seed {state.seed}: not started after {limit:g} s: it waits for the "
                             "cluster's resources, or its environment or code hangs while starting "
                             "(resources.stall_warning_s sets this warning)")
    return lines


class TrialRunner:
    """One configuration, one actor per seed; emits events to `listeners`, in their order."""

    def __init__(self, spec: ExperimentSpec, listeners: list[Listener] | None = None, *, label: str | None = None,
                 meta: TrialMeta | None = None, pool: ActorPool | None = None, chunk_seconds: float = 1.0,
                 backend: Backend | None = None):
        self.spec = spec
        self.backend = backend or (pool.backend if pool is not None else ray_backend())
        self.listeners: list[Listener] = list(listeners or [])
        self.info = registry.get(spec.algorithm)
        self.experiment = spec.tracking.experiment or spec.name
        self.label = label or spec.name
        self.meta = meta or TrialMeta()
        self.pool = pool
        self.chunk_seconds = chunk_seconds
        self.seeds: dict[int, SeedState] = {}
        self.status = Status.PENDING
        self.stop_reason = ""
        self.suspended = False  # every seed paused and its actor freed (PBT: waiting its turn)

    def emit(self, event: Event) -> Decision:
        """Hand the event to every listener in order; the first decision other than CONTINUE wins."""
        decision = CONTINUE
        for listener in self.listeners:
            answer = listener.handle(event)
            if answer is not None and answer.action != Action.CONTINUE and decision.action == Action.CONTINUE:
                decision = answer
        return decision

    # --- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch every seed, then tell the listeners: the seeds train while the record of their start is
        written (a short trial's results are not looked at before `start` returns, so no listener hears of
        a result before its seed's start)."""
        self.status = Status.RUNNING
        try:
            self._launch_all([self.seeds.setdefault(seed, SeedState(seed)) for seed in self.spec.seeds])
        finally:  # also after a Ctrl-C during a launch: its end states need the runs to exist
            self.announce_start()

    def announce_start(self) -> None:
        self.emit(TrialStarted(self))
        for seed in self.spec.seeds:
            self.seeds.setdefault(seed, SeedState(seed))
            self.emit(SeedStarted(self, seed, self.spec.budget.total))

    def resume(self, records: dict[int, SeedRecord]) -> None:
        """Continue a trial that a dead (or interrupted) driver left: its finished seeds stay finished,
        every other seed continues from its last durable checkpoint (from scratch without one), and each
        metric step is delivered at most once."""
        self.status = Status.RUNNING
        self.emit(TrialStarted(self, resumed=True))
        pending = []
        for seed in self.spec.seeds:
            record = records.get(seed)
            if record is not None and record.status == Status.FINISHED:
                state = self.seeds[seed] = SeedState(seed, Status.FINISHED, progress=self.spec.budget.total,
                                                     final=dict(record.final), evals=_copy_evals(record.evals))
                self.emit(SeedRestored(self, seed, record))
                continue
            state = self._add_seed(seed, record)
            if record is not None:
                state.checkpoint, state.logged, state.retries = record.checkpoint, dict(record.logged), record.retries
                state.evals = _copy_evals(record.evals)
            pending.append(state)
        self._launch_all(pending)
        self._maybe_finish_trial()

    def _add_seed(self, seed: int, record: SeedRecord | None = None) -> SeedState:
        state = self.seeds[seed] = SeedState(seed)
        self.emit(SeedStarted(self, seed, self.spec.budget.total, record))
        return state

    def _launch_all(self, states: list[SeedState]) -> None:
        """One actor per seed, or per `seeds_per_actor` seeds (a unit)."""
        size = self.spec.resources.seeds_per_actor
        if size == 1:
            for state in states:
                self._launch(state)
            return
        for start in range(0, len(states), size):
            members = [(self, state) for state in states[start:start + size]]
            Unit(members, self.pool, self.chunk_seconds, grouped=True).launch()

    def _launch(self, state: SeedState) -> None:
        Unit([(self, state)], self.pool, self.chunk_seconds, grouped=False).launch()

    # --- results --------------------------------------------------------------------------------
    def futures(self) -> dict[Any, SeedState]:
        return {s.future: s for s in self.seeds.values() if s.future is not None}

    def on_result(self, state: SeedState) -> None:
        if state.unit is not None:
            state.unit.on_result()

    def announce(self, state: SeedState) -> None:
        """The seed's first result since its (re)launch: where it runs (a retried seed may run on another
        node)."""
        if not state.placed:
            state.placed = True
            if self.pool is not None:
                self.pool.placed(state)
            if state.where is not None:
                self.emit(SeedPlaced(self, state.seed, state.where))

    def take(self, state: SeedState, result: SeedChunk) -> Decision:
        """Deliver one seed's chunk to the listeners; their decision."""
        records = self._new_records(state, result.records)
        if records or result.progress != state.progress:
            state.moved, state.stall_warned = time.perf_counter(), False
        state.progress = result.progress
        state.busy += result.busy_s
        durable = None
        if result.checkpoint is not None:
            state.checkpoint = result.checkpoint
            if not result.done:  # durable: a rerun after this driver dies continues from here
                durable = state.checkpoint
        if result.done:
            state.final = result.final
        decision = self.emit(ChunkResult(self, state.seed, records, result.artifacts, state.progress,
                                         durable, result.done, dict(state.latest), result.resumed))
        for step, values in records:
            evals = {k: v for k, v in values.items() if k.startswith(M.EVAL_PREFIX)}
            if decision.action == Action.STOP:  # a pruned trial reports nothing after the step that pruned it
                break
            if evals:
                answer = self.emit(Evaluation(self, state.seed, step, evals))
                decision = answer if decision.action == Action.CONTINUE else decision
        return decision

    def apply(self, state: SeedState, decision: Decision, done: bool) -> None:
        """What happens to the seed after its chunk: its end, the trial's end, or a pause (a seed alone in its
        actor); otherwise its unit goes on with it."""
        if decision.action == Action.STOP:
            if done:
                self.finish_seed(state, decision.reason)
            self.stop(decision.status, decision.reason)
        elif done:
            self.finish_seed(state)
        elif decision.action == Action.PAUSE and state.shared is None:
            state.paused = True
            self.emit(SeedPaused(self, state.seed, state.progress))

    def _new_records(self, state: SeedState, records: list[tuple[int, dict[str, float]]]
                     ) -> list[tuple[int, dict[str, float]]]:
        """Exactly once: a seed restarted from its checkpoint redoes the steps delivered since; each
        metric keeps the first value of a step (the same value, where resume is exact)."""
        fresh = []
        for step, values in records:
            values = {k: v for k, v in values.items() if step > state.logged.get(k, -1)}
            if not values:
                continue
            state.logged.update(dict.fromkeys(values, step))
            state.latest.update(values)
            if any(k.startswith(M.EVAL_PREFIX) for k in values):
                state.evals.setdefault(step, {}).update(values)
            fresh.append((step, values))
        return fresh

    # --- schedulers' seams ----------------------------------------------------------------------
    def resume_seed(self, seed: int) -> None:
        """Go on with a paused seed (from its state as it was, or as `retarget` set it)."""
        state = self.seeds[seed]
        if not state.paused or state.status != Status.RUNNING:
            return
        state.paused = False
        assert state.unit is not None
        if state.reload:
            state.reload = False
            # The same actor loads the new trial state in place (no new process; the placement group stays).
            state.unit.advance(state.unit.load())
        else:
            state.unit.advance()

    def retarget(self, spec: ExperimentSpec, checkpoints: dict[int, bytes]) -> None:
        """PBT's exploit and explore: the paused seeds go on from `checkpoints` (another trial's) with the
        new `spec` (new hyperparameters, same shape) when they resume."""
        self.spec = spec
        for seed, checkpoint in checkpoints.items():
            state = self.seeds[seed]
            state.checkpoint, state.reload = checkpoint, True

    def suspend(self) -> None:
        """Free the actors of a trial whose seeds are all paused (its turn is over: others wait for the
        resources); `unsuspend` relaunches each seed from its checkpoint."""
        self.suspended = True
        for state in self.seeds.values():
            if state.paused and state.status == Status.RUNNING:
                self._release(state, reusable=True)

    def unsuspend(self) -> None:
        self.suspended = False
        for state in self.seeds.values():
            if state.paused and state.status == Status.RUNNING:
                state.reload = False
                self._launch(state)

    # --- the end --------------------------------------------------------------------------------
    def adopt(self, state: SeedState, host: Host) -> None:
        """A waiting seed takes an idle actor of its shape instead of its own unplaced reservation."""
        if state.unit is not None:
            state.unit.adopt(host)

    def _release(self, state: SeedState, reusable: bool = False) -> None:
        """Free the seed's share of its actor: the unit frees the actor once its last seed lets go (an idle,
        healthy one goes back to the pool)."""
        if self.pool is not None:
            self.pool.placed(state)
        if state.unit is not None:
            unit, state.unit = state.unit, None
            unit.let_go(state, reusable)

    def finish_seed(self, state: SeedState, reason: str = "") -> None:
        self._release(state, reusable=True)
        state.status = Status.FINISHED
        self.emit(SeedEnded(self, state.seed, Status.FINISHED, state.final, state.checkpoint))
        if not reason:
            self._maybe_finish_trial()

    def fail(self, state: SeedState, error: str) -> None:
        self._release(state)
        state.status, state.error = Status.FAILED, error
        self.emit(SeedEnded(self, state.seed, Status.FAILED, error=error))
        self._maybe_finish_trial()

    @property
    def done(self) -> bool:
        return self.status.ended

    def _seed_ends(self) -> dict[str, Any]:
        """`TrialEnded.finals` and `.errors`."""
        return {"finals": {s.seed: s.final for s in self.seeds.values()},
                "errors": {s.seed: s.error for s in self.seeds.values() if s.error}}

    def _maybe_finish_trial(self) -> None:
        if self.done or any(not s.status.ended for s in self.seeds.values()):
            return
        finals = [s.final for s in self.seeds.values() if s.status == Status.FINISHED and s.final]
        step = max((s.progress for s in self.seeds.values()), default=0)
        failed = [s for s in self.seeds.values() if s.status == Status.FAILED]
        self.status = Status.FAILED if failed else Status.FINISHED
        error = "; ".join(f"seed {s.seed}: {(s.error or '').strip().splitlines()[-1][:300]}" for s in failed)
        self.emit(TrialEnded(self, self.status, aggregate_finals(finals), step, error or None, **self._seed_ends()))

    def eval_means(self, metric: str) -> dict[int, float]:
        """{metric step: mean over the running or finished seeds} for the steps every such seed has
        evaluated (the intermediate values a sweep reports to its pruner)."""
        return shared_step_means([s.evals for s in self.seeds.values()
                                  if s.status in (Status.RUNNING, Status.FINISHED)], metric)

    def stop(self, status: Status | str = Status.KILLED, reason: str = "", release: bool = True) -> None:
        """End every unfinished seed and the trial as `status` (a scheduler's stop, Ctrl-C, a driver
        error), then (with `release`) free their actors. The events come first and touch no Ray: a
        SIGTERM to the process group (what `timeout`, Slurm and Kubernetes send) reaches a local Ray's own
        processes too, and a Ray call on a dead cluster blocks for a minute before Ray ends the process."""
        status = Status(status)
        for state in [s for s in self.seeds.values() if not s.status.ended]:
            state.status = status
            self.emit(SeedEnded(self, state.seed, status, state.final, state.checkpoint))
        if not self.done and self.status != Status.PENDING:
            self.status, self.stop_reason = status, reason
            self.emit(TrialEnded(self, status, {}, max((s.progress for s in self.seeds.values()), default=0),
                                 reason=reason, **self._seed_ends()))
        if release:
            self.release()

    def release(self) -> None:
        """Free every actor and placement group this runner still holds (idle ones go to the pool)."""
        for state in self.seeds.values():
            if state.unit is not None:
                self._release(state, reusable=state.status == Status.FINISHED)


class Unit:
    """One trial actor, with its placement group, its call in flight, where it runs and its retries, and the
    seeds it trains: one seed alone (a `TrialWorker`), or several (`grouped`: a `TrialWorkerGroup`, with
    `resources.seeds_per_actor`, of one trial or of several trials of a sweep with `sweep.share_actors`,
    each with its trial's spec; seedgroup.py says how they train together).

    Each chunk's result goes to each seed's own runner (its listeners, its pruner, its end). A seed whose
    trial ended (pruned, failed) is let go: a group drops it at the next call, and the actor is freed once
    its last seed lets go (to the pool, when it is idle and healthy). If the actor dies, every seed with
    retries left restarts from its own checkpoint in one new actor, in a new reservation: where its node
    died, Ray would reschedule the old placement group, and a group that cannot be placed at once (a full
    cluster that lost a node) is retried without pause, which keeps Ray's GCS busy and the remaining training
    starved until a CPU frees. A new group waits its turn like any other."""

    def __init__(self, members: list[tuple[TrialRunner, SeedState]], pool: ActorPool | None, chunk_seconds: float,
                 grouped: bool):
        self.members = dict(enumerate(members))  # key -> (its trial's runner, its seed's state)
        self.pool, self.chunk_seconds, self.grouped = pool, chunk_seconds, grouped
        self.backend = members[0][0].backend
        self.actor: Any = None
        self.group: PlacementGroup | None = None
        self.future: Any = None
        self.where: dict[str, str] | None = None
        self.dropped: list[int] = []  # keys to take out of a group's actor at its next call
        for _, state in members:
            state.unit = self

    @property
    def spec(self) -> ExperimentSpec:
        """The resources and the shape every member shares (a lone seed's spec may be retargeted: PBT)."""
        return self.members[0][0].spec

    def _live(self) -> list[tuple[int, TrialRunner, SeedState]]:
        return [(key, runner, state) for key, (runner, state) in self.members.items()
                if state.unit is self and not state.status.ended]

    def load(self) -> tuple[Any, ...]:
        """What the actor loads: every live seed, each with its trial's spec and its checkpoint, if any."""
        live = self._live()
        if not self.grouped:
            _, runner, state = live[0]
            return runner.spec.model_dump(mode="json"), state.seed, state.checkpoint
        specs: list[dict[str, Any]] = []
        index: dict[int, int] = {}
        for _, runner, _ in live:
            if id(runner) not in index:
                index[id(runner)] = len(specs)
                specs.append(runner.spec.model_dump(mode="json"))
        return (specs, [(key, index[id(runner)], state.seed) for key, runner, state in live],
                {key: state.checkpoint for key, _, state in live})

    def launch(self, host: Host | None = None) -> None:
        """Load every live seed into a warm actor (`host`, or one of the pool's), or a new one."""
        live = self._live()
        load = self.load()
        self.dropped = []
        if host is None and self.pool is not None and self.group is None:
            host = self.pool.take(self.spec)
        fresh = False
        if host is not None:
            self.actor, self.group, self.where = host.actor, host.group, host.where
            self.advance(load)
        else:
            fresh = self.group is None
            if self.group is None:
                self.group = self.backend.reserve(trial_bundles(self.spec))
            res, self.where = self.spec.resources, None
            worker = TrialWorkerGroup if self.grouped else TrialWorker
            gpus = res.gpus_per_trial if self.grouped else res.gpus_per_trial / res.data_parallel
            self.actor = self.backend.start(worker, self.group, res.cpus_per_trial, gpus, *load)
            self.future = self.backend.call(self.actor, "advance", self.chunk_seconds)
        for _, _, state in live:
            state.status, state.placed, state.paused = Status.RUNNING, False, False
            state.moved, state.where = time.perf_counter(), self.where
        if fresh and self.pool is not None and live:
            self.pool.wait(live[0][1], live[0][2])

    def advance(self, load: tuple[Any, ...] | None = None) -> None:
        """The actor's next chunk (after loading `load` first, when given)."""
        if self.grouped:
            self.future = self.backend.call(self.actor, "advance", self.chunk_seconds, load, self.dropped)
            self.dropped = []
        elif load is not None:
            self.future = self.backend.call(self.actor, "advance", self.chunk_seconds, load)
        else:
            self.future = self.backend.call(self.actor, "advance", self.chunk_seconds)

    def adopt(self, host: Host) -> None:
        """Take an idle actor of the same shape instead of this unit's unplaced reservation."""
        self.backend.free(self.actor, self.group)
        self.actor = self.group = self.future = None
        self.launch(host)

    def on_result(self) -> None:
        future, self.future = self.future, None
        live = self._live()
        try:
            result = self.backend.get(future)
        except self.backend.errors as exc:
            self._on_error(live, exc)
            return
        if live and self.where is None:  # one node lookup for the unit
            try:
                self.where = self.backend.ask(self.actor, "describe", timeout=30)
            except Exception:  # informational only; the run goes on without it
                self.where = None
        parts = result.seeds if self.grouped else {key: result for key, _, _ in live}
        for key, runner, state in live:
            part = parts.get(key)
            if part is None or state.unit is not self or state.status.ended:
                continue  # (its trial ended meanwhile: it was let go, and is dropped at the next call)
            state.where = state.where or self.where
            runner.announce(state)
            if isinstance(part, SeedFailed):
                runner.fail(state, part.error)
                continue
            runner.apply(state, runner.take(state, part), part.done)
        if self.actor is not None and any(not state.paused for _, _, state in self._live()):
            self.advance()

    def let_go(self, state: SeedState, reusable: bool) -> None:
        """A seed leaves the unit (it ended, or its trial is suspended); the last one to leave frees the actor:
        to the pool where it is idle and healthy (for a seed alone, where `reusable`: not after a failure)."""
        key = next(k for k, (_, s) in self.members.items() if s is state)
        self.dropped.append(key)
        if self._live():
            return
        if (reusable or self.grouped) and self.future is None and self.actor is not None and self.group is not None \
                and self.pool is not None:
            self.pool.put(self.spec, Host(self.actor, self.group, self.where))
        else:
            self.backend.free(self.actor, self.group)
        self.actor = self.group = None

    def _on_error(self, live: list[tuple[int, TrialRunner, SeedState]], exc: BaseException) -> None:
        """The actor died: each seed restarts from its own checkpoint in one new actor (in a new reservation),
        or fails once its retries are spent. A trainer that raised, or could not be built, fails its seeds:
        that is deterministic, and not retried."""
        self.backend.free(self.actor, self.group)  # the result can be lost while its actor lives on
        self.actor = self.group = None
        text = self.backend.error_text(exc)
        if not self.backend.lost(exc):
            for _, runner, state in live:
                runner.fail(state, text)
            return
        spent = []
        for _, runner, state in live:
            if state.retries < runner.spec.resources.max_retries:
                state.retries += 1
                runner.emit(SeedRetried(runner, state.seed, state.retries, text))
            else:
                spent.append((runner, state))
        for runner, state in spent:  # (let go first: the relaunch below loads only the others)
            runner.fail(state, f"trial actor died {state.retries + 1} times; last: {text}")
        if self._live():
            self.launch()


def start_shared(runners: list[TrialRunner], capacity: int) -> None:
    """Start these trials with their seeds packed in order into shared actors of up to `capacity` seeds
    (`sweep.share_actors`), then tell each trial's listeners, as `TrialRunner.start` does. The seeds are
    spread evenly over as many actors as the capacity needs, and at least as many as the cluster's CPUs
    hold at once (two trials of one seed on two cores: two actors, not one)."""
    pairs = []
    for runner in runners:
        runner.status = Status.RUNNING
        pairs += [(runner, runner.seeds.setdefault(seed, SeedState(seed))) for seed in runner.spec.seeds]
    cpus = runners[0].backend.cpus() if runners else 1.0
    fill = max(1, int(cpus // max(runners[0].spec.resources.cpus_per_trial, 1e-9))) if runners else 1
    units = max(math.ceil(len(pairs) / capacity), min(len(pairs), fill))
    try:
        for k in range(units):
            chunk = pairs[k * len(pairs) // units:(k + 1) * len(pairs) // units]
            Unit(chunk, chunk[0][0].pool, chunk[0][0].chunk_seconds, grouped=True).launch()
    finally:  # also after a Ctrl-C during a launch: its end states need the runs to exist
        for runner in runners:
            runner.announce_start()


def shared_step_means(evals: list[dict[int, dict[str, float]]], metric: str, after: int = -1) -> dict[int, float]:
    """{step: mean over the seeds} of `metric` at each step after `after` that every seed's evaluations (one
    {step: values} per seed) hold, in step order."""
    if not evals:
        return {}
    steps = set.intersection(*({step for step, values in e.items() if step > after and metric in values}
                               for e in evals))
    return {step: float(np.mean([e[step][metric] for e in evals])) for step in sorted(steps)}


def _copy_evals(evals: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    return {step: dict(values) for step, values in evals.items()}


def aggregate_finals(finals: list[dict[str, float]]) -> dict[str, float]:
    """Mean and std over seeds of each seed's last `eval/*` value (ARCHITECTURE section 6)."""
    out: dict[str, float] = {}
    keys = sorted({k for f in finals for k in f if k.startswith(M.EVAL_PREFIX)})
    for key in keys:
        values = [f[key] for f in finals if key in f]
        out[key] = float(np.mean(values))
        out[key + M.STD_SUFFIX] = float(np.std(values))
    return out


def drive_once(runners: list[TrialRunner], poll_seconds: float = 0.5) -> bool:
    """Handle whichever results arrive within `poll_seconds`; False once no runner has work left."""
    owners: dict[Any, tuple[TrialRunner, SeedState]] = {}
    for runner in runners:
        for future, state in runner.futures().items():
            owners[future] = (runner, state)
    if not owners:
        return False
    for future in runners[0].backend.wait(list(owners), poll_seconds):
        runner, state = owners[future]
        runner.on_result(state)
    return True


def drive(runners: list[TrialRunner], poll_seconds: float = 0.5) -> None:
    """Run every runner's seeds to an end state, reacting to whichever result arrives first."""
    while drive_once(runners, poll_seconds):
        pass
