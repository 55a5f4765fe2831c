"""The driver loop: trial actors on Ray, results streamed back, MLflow written by the driver alone.

`TrialRunner` drives one configuration (one `trial` run) with one actor per seed (one `seed` run each).
Each seed's actors are reserved together as one placement group, so parallel trials cannot deadlock on
partial reservations. `drive()` polls any number of runners through one `ray.wait`, so a suite's trials
share the cluster. A seed whose actor dies (or a worker it calls, or the node holding its last result)
is restarted from its last checkpoint up to `resources.max_retries` times; a seed whose trainer raises
fails with the error as a tag. `abort()` kills the actors and ends every run it opened as KILLED.

With an `ActorPool` (sweeps use one), a seed that finishes hands its idle actor and placement group to
the pool, and the next seed of the same shape loads its trial into them instead of starting a process:
creating an actor costs about a second, far more than a short trial.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.orchestration.trial import TrialWorker
from labfleet.spec.models import ExperimentSpec
from labfleet.tracking.resume import LABEL_TAG, LATEST_CHECKPOINT, SeedRecord
from labfleet.tracking.runs import Tracker, flatten, git_commit, library_versions

RemoteTrialWorker = ray.remote(TrialWorker)


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
    needed: dict[str, float] = {}
    for bundle in trial_bundles(spec):
        for key, value in bundle.items():
            needed[key] = needed.get(key, 0.0) + value
    for key, value in needed.items():
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
    return json.dumps([trial_bundles(spec), res.cpus_per_trial, res.gpus_per_trial])


class ActorPool:
    """Idle trial actors, by the shape of their placement group. Taking a host of one shape first frees
    the idle hosts of other shapes, so that idle actors never hold resources a new trial needs."""

    def __init__(self) -> None:
        self.idle: dict[str, list[Host]] = {}
        self.reused = 0

    def take(self, spec: ExperimentSpec) -> Host | None:
        key = _bundles_key(spec)
        for other in [k for k in self.idle if k != key]:
            for host in self.idle.pop(other):
                _kill(host.actor, host.group)
        hosts = self.idle.get(key)
        if not hosts:
            return None
        self.reused += 1
        return hosts.pop()

    def put(self, spec: ExperimentSpec, host: Host) -> None:
        self.idle.setdefault(_bundles_key(spec), []).append(host)

    def shutdown(self) -> None:
        for hosts in self.idle.values():
            for host in hosts:
                _kill(host.actor, host.group)
        self.idle.clear()


def _kill(actor: Any, group: PlacementGroup | None) -> None:
    try:
        if actor is not None:
            ray.kill(actor, no_restart=True)
        if group is not None:
            remove_placement_group(group)
    except Exception:  # Ray is shutting down (Ctrl-C reaches its processes too): nothing left to free
        pass


@dataclass
class SeedState:
    seed: int
    run_id: str
    status: str = "PENDING"  # PENDING -> RUNNING -> FINISHED | FAILED | KILLED
    actor: Any = None
    group: PlacementGroup | None = None
    future: Any = None
    checkpoint: bytes | None = None
    progress: int = 0
    latest: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] | None = None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # metric step -> eval/* values
    logged: dict[str, int] = field(default_factory=dict)  # metric -> the last step logged (exactly once)
    retries: int = 0
    placed: bool = False  # the current actor's node is tagged on the run
    where: dict[str, str] | None = None  # the current actor's node, host and device
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0


class TrialRunner:
    """One configuration: a `trial` run with one `seed` child per seed."""

    def __init__(self, spec: ExperimentSpec, tracker: Tracker, *, parent_run_id: str | None = None,
                 spec_dir: str | Path = ".", progress: Any = None, chunk_seconds: float = 1.0,
                 trial_tags: dict[str, str] | None = None, label: str | None = None, pool: ActorPool | None = None,
                 trial_params: dict[str, str] | None = None):
        """`trial_params`: the trial run's params instead of the flattened spec (a sweep's sampled values);
        every seed run has the whole resolved spec either way."""
        self.spec = spec
        self.tracker = tracker
        self.info = registry.get(spec.algorithm)
        self.experiment = spec.tracking.experiment or spec.name
        self.parent_run_id = parent_run_id
        self.spec_dir = str(spec_dir)
        self.progress = progress
        self.chunk_seconds = chunk_seconds
        self.trial_tags = trial_tags or {}
        self.trial_params = trial_params or {}
        self.label = label or spec.name
        self.pool = pool
        self.trial_run_id: str | None = None
        self.run_name = self.label  # in MLflow: the label, distinct among reruns (`_distinct_name`)
        self.seeds: dict[int, SeedState] = {}
        self.status = "PENDING"

    # --- start ----------------------------------------------------------------------------------
    def _seed_tags(self, seed: int) -> dict[str, str]:
        spec = self.spec
        tags = {"labfleet.algorithm": spec.algorithm, "labfleet.seed": str(seed),
                "labfleet.config_hash": config_hash(spec)}
        tags["labfleet.env" if spec.env else "labfleet.dataset"] = str(spec.env or spec.dataset)
        commit, dirty = git_commit(self.spec_dir)
        if commit:
            tags["labfleet.git_commit"] = commit
            tags["labfleet.git_dirty"] = str(dirty).lower()
        tags.update({f"labfleet.lib.{k}": v for k, v in library_versions().items()})
        return tags

    def start(self) -> None:
        spec = self.spec
        tags = {"labfleet.algorithm": spec.algorithm, "labfleet.config_hash": config_hash(spec),
                "labfleet.env" if spec.env else "labfleet.dataset": str(spec.env or spec.dataset),
                **self.trial_tags}
        # A sweep names its trial's params itself (the sampled values); otherwise the whole configuration.
        params = self.trial_params or flatten(spec.model_dump(mode="json", exclude={"seeds"}))
        params = {**params, "seeds": json.dumps(spec.seeds)}
        # A sweep's labels are distinct already (its trial numbers); elsewhere reruns of a spec are told apart.
        self.run_name = self.label if self.trial_params else self._distinct_name()
        self.trial_run_id = self.tracker.start_run(self.experiment, "trial", self.run_name, self.parent_run_id,
                                                   tags={**tags, LABEL_TAG: self.label}, params=params)
        for seed in spec.seeds:
            self._launch(self._add_seed(seed, self._new_seed_run(seed)))
        self.status = "RUNNING"

    def _distinct_name(self) -> str:
        """The label, or "label #N" for the N-th trial run of this label in the experiment, so that reruns
        of a spec are told apart in the MLflow UI and in reports."""
        earlier = self.tracker.client.search_runs(
            [self.tracker.experiment_id(self.experiment)],
            f"tags.`labfleet.role` = 'trial' and tags.`{LABEL_TAG}` = '{self.label}'", max_results=10_000)
        return self.label if not earlier else f"{self.label} #{len(earlier) + 1}"

    def resume(self, trial_run: Any, records: dict[int, SeedRecord]) -> None:
        """Continue a trial run that a dead (or interrupted) driver left: its finished seeds stay finished,
        every other seed run is reopened and continues from its last durable checkpoint (from scratch
        without one), logging each metric step at most once."""
        self.trial_run_id = trial_run.info.run_id
        self.run_name = trial_run.data.tags.get("mlflow.runName", self.label)
        self.tracker.reopen_run(self.trial_run_id, "trial")
        self.status = "RUNNING"
        for seed in self.spec.seeds:
            record = records.get(seed)
            if record is None:  # the driver died before it made this seed's run
                self._launch(self._add_seed(seed, self._new_seed_run(seed)))
                continue
            state = self._add_seed(seed, record.run_id)
            if record.status == "FINISHED":
                state.status, state.final, state.progress = "FINISHED", record.final, self.spec.budget.total
                if self.progress is not None:
                    self.progress.update((self.label, seed), state.progress, "")
                    self.progress.finish((self.label, seed), "FINISHED")
                continue
            self.tracker.reopen_run(record.run_id, "seed")
            state.checkpoint, state.logged, state.retries = record.checkpoint, dict(record.logged), record.retries
            self.tracker.queue_tags(record.run_id, {"labfleet.resumed_from": "checkpoint" if record.checkpoint
                                                    else "scratch"})
            self._launch(state)
        self._maybe_finish_trial()

    def _new_seed_run(self, seed: int) -> str:
        assert self.trial_run_id is not None
        seed_spec = {**self.spec.model_dump(mode="json"), "seeds": [seed]}
        run_id = self.tracker.start_run(self.experiment, "seed", f"{self.run_name}/seed={seed}", self.trial_run_id,
                                        tags=self._seed_tags(seed), params=flatten(seed_spec))
        self.tracker.log_yaml(run_id, "spec.yaml", seed_spec)
        return run_id

    def _add_seed(self, seed: int, run_id: str) -> SeedState:
        state = SeedState(seed, run_id)
        self.seeds[seed] = state
        if self.progress is not None:
            self.progress.add((self.label, seed), f"{self.label} seed={seed}", self.spec.budget.total)
        return state

    def _launch(self, state: SeedState) -> None:
        spec = self.spec
        state.status, state.placed, state.where = "RUNNING", False, None
        host = self.pool.take(spec) if self.pool is not None and state.group is None else None
        if host is not None:  # a warm actor: load this seed into it
            state.actor, state.group, state.where = host.actor, host.group, host.where
            state.future = state.actor.advance.remote(
                self.chunk_seconds, (spec.model_dump(mode="json"), state.seed, state.checkpoint))
            return
        if state.group is None:
            state.group = placement_group(trial_bundles(spec), strategy="PACK")
        res = spec.resources
        state.actor = RemoteTrialWorker.options(
            num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial / res.data_parallel, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(state.group, placement_group_bundle_index=0),
        ).remote(spec.model_dump(mode="json"), state.seed, state.checkpoint)
        state.future = state.actor.advance.remote(self.chunk_seconds)

    # --- results --------------------------------------------------------------------------------
    def futures(self) -> dict[Any, SeedState]:
        return {s.future: s for s in self.seeds.values() if s.future is not None}

    def on_result(self, state: SeedState) -> None:
        future, state.future = state.future, None
        try:
            result = ray.get(future)
        except RayError as exc:
            if _lost(exc) and state.retries < self.spec.resources.max_retries:
                # a process, a node or the result died with it: retry from the last checkpoint
                state.retries += 1
                self.tracker.queue_tags(state.run_id, {"labfleet.retries": str(state.retries)})
                _kill(state.actor, None)  # the result can be lost while its actor lives on
                self._launch(state)
            elif _lost(exc):
                self._fail(state, f"trial actor died {state.retries + 1} times; last: {_error_text(exc)}")
            else:  # the trainer raised, or could not be built: deterministic, not retried
                self._fail(state, _error_text(exc))
            return
        if not state.placed:  # after every (re)launch: a retried trial may run on another node
            state.placed = True
            self._tag_node(state)
        self._log_records(state, result["records"])
        for path, data in result.get("artifacts", {}).items():
            self.tracker.log_bytes(state.run_id, path, data)
        self.tracker.flush(state.run_id)
        state.progress = result["progress"]
        if result["checkpoint"] is not None:
            state.checkpoint = result["checkpoint"]
            if not result["done"]:  # durable: a rerun after this driver dies continues from here
                self.tracker.log_bytes(state.run_id, LATEST_CHECKPOINT, state.checkpoint)
        if self.progress is not None:
            self.progress.update((self.label, state.seed), state.progress, self._headline(state.latest))
        if result["done"]:
            state.final = result["final"]
            self._finish_seed(state)
        else:
            state.future = state.actor.advance.remote(self.chunk_seconds)

    def _log_records(self, state: SeedState, records: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in records:
            # Exactly once: a seed restarted from its checkpoint redoes the steps logged since; each metric
            # history keeps the first value of a step (the same value, where resume is exact).
            values = {k: v for k, v in values.items() if step > state.logged.get(k, -1)}
            if not values:
                continue
            state.logged.update(dict.fromkeys(values, step))
            self.tracker.log_metrics(state.run_id, values, step)
            state.latest.update(values)
            if any(k.startswith(M.EVAL_PREFIX) for k in values):
                state.evals.setdefault(step, {}).update(values)

    def _tag_node(self, state: SeedState) -> None:
        where = state.where
        if where is None:
            try:
                where = state.where = ray.get(state.actor.describe.remote(), timeout=30)
            except Exception:  # informational only; the run goes on without the tag
                return
        self.tracker.queue_tags(state.run_id, {"labfleet.node": where["node_id"], "labfleet.host": where["host"],
                                             "labfleet.device": where["device"]})

    def _headline(self, latest: dict[str, float]) -> str:
        rate = f" {latest[M.SPS]:.0f} sps" if M.SPS in latest else ""
        keys = [self.info.primary_metric] if self.info.primary_metric else sorted(
            k for k in latest if k.startswith(M.EVAL_PREFIX))  # your own code: its first evaluation
        for key in [*keys[:1], M.TRAIN_EPISODE_RETURN]:
            if key in latest:
                return f"{key}={latest[key]:.4g}{rate}"
        return rate.strip()

    def _release(self, state: SeedState, reusable: bool = False) -> None:
        """Free the seed's actor and placement group; an idle, healthy actor goes back to the pool."""
        if reusable and self.pool is not None and state.future is None and state.actor is not None \
                and state.group is not None:
            self.pool.put(self.spec, Host(state.actor, state.group, state.where))
        else:
            _kill(state.actor, state.group)
        state.actor = state.group = None
        state.elapsed = time.perf_counter() - state.started

    def _finish_seed(self, state: SeedState) -> None:
        if state.checkpoint is not None:
            self.tracker.log_bytes(state.run_id, "checkpoints/final.pt", state.checkpoint)
        self._release(state, reusable=True)
        state.status = "FINISHED"
        self.tracker.end_run(state.run_id, "FINISHED")
        if self.progress is not None:
            self.progress.finish((self.label, state.seed), "FINISHED")
        self._maybe_finish_trial()

    def _fail(self, state: SeedState, error: str) -> None:
        self._release(state)
        state.status, state.error = "FAILED", error
        self.tracker.end_run(state.run_id, "FAILED", error)
        if self.progress is not None:
            self.progress.finish((self.label, state.seed), "FAILED")
        self._maybe_finish_trial()

    # --- the end --------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.status in ("FINISHED", "FAILED", "KILLED")

    def _maybe_finish_trial(self) -> None:
        if self.done or any(s.status in ("PENDING", "RUNNING") for s in self.seeds.values()):
            return
        assert self.trial_run_id is not None
        finals = [s.final for s in self.seeds.values() if s.status == "FINISHED" and s.final]
        step = max((s.progress for s in self.seeds.values()), default=0)
        self.tracker.log_metrics(self.trial_run_id, aggregate_finals(finals), step)
        failed = [s for s in self.seeds.values() if s.status == "FAILED"]
        self.status = "FAILED" if failed else "FINISHED"
        error = "; ".join(f"seed {s.seed}: {(s.error or '').strip().splitlines()[-1][:300]}" for s in failed)
        self.tracker.end_run(self.trial_run_id, self.status, error or None)

    def eval_means(self, metric: str) -> dict[int, float]:
        """{metric step: mean over the running or finished seeds} for the steps every such seed has
        evaluated (the intermediate values a sweep reports to its pruner)."""
        seeds = [s for s in self.seeds.values() if s.status in ("RUNNING", "FINISHED")]
        if not seeds:
            return {}
        steps = set.intersection(*({k for k, v in s.evals.items() if metric in v} for s in seeds))
        return {step: float(np.mean([s.evals[step][metric] for s in seeds])) for step in sorted(steps)}

    def abort(self, status: str = "KILLED", release: bool = True) -> None:
        """End every unfinished seed run and the trial run as `status`, then (with `release`) free their
        actors. The records come first and touch no Ray: a SIGTERM to the process group (what `timeout`,
        Slurm and Kubernetes send) reaches a local Ray's own processes too, and a Ray call on a dead
        cluster blocks for a minute before Ray ends the process."""
        stopped = [s for s in self.seeds.values() if s.status in ("PENDING", "RUNNING")]
        for state in stopped:
            state.status = status
            self.tracker.end_run(state.run_id, status)
            if self.progress is not None:  # a pruned or stopped seed's bar goes (in a sweep) or says so
                self.progress.finish((self.label, state.seed), status)
        if self.trial_run_id and not self.done:
            self.status = status
            self.tracker.end_run(self.trial_run_id, status)
        if release:
            self.release()

    def release(self) -> None:
        """Free every actor and placement group this runner still holds (idle ones go to the pool)."""
        for state in self.seeds.values():
            if state.actor is not None or state.group is not None:
                self._release(state, reusable=state.status == "FINISHED")


def aggregate_finals(finals: list[dict[str, float]]) -> dict[str, float]:
    """Mean and std over seeds of each seed's last `eval/*` value (ARCHITECTURE section 6)."""
    out: dict[str, float] = {}
    keys = sorted({k for f in finals for k in f if k.startswith(M.EVAL_PREFIX)})
    for key in keys:
        values = [f[key] for f in finals if key in f]
        out[key] = float(np.mean(values))
        out[key + M.STD_SUFFIX] = float(np.std(values))
    return out


def _lost(exc: RayError) -> bool:
    """Whether a trial's call failed because something died (its actor's process, a rollout worker or
    data-parallel rank it called, a node, or the node holding its result) rather than because its code
    raised. A trainer that could not be built fails the same way at every try, so it counts as raised."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, RayActorError):
        return not cause.actor_init_failed
    return isinstance(cause, (ObjectLostError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError))


def _error_text(exc: BaseException) -> str:
    cause = exc.cause if isinstance(exc, RayTaskError) else None
    text = str(exc)
    if cause is not None:
        text = f"{type(cause).__name__}: {cause}\n{text}"
    return text


def drive_once(runners: list[TrialRunner], poll_seconds: float = 0.5) -> bool:
    """Handle whichever results arrive within `poll_seconds`; False once no runner has work left."""
    owners: dict[Any, tuple[TrialRunner, SeedState]] = {}
    for runner in runners:
        for future, state in runner.futures().items():
            owners[future] = (runner, state)
    if not owners:
        return False
    ready, _ = ray.wait(list(owners), num_returns=1, timeout=poll_seconds)
    for future in ready:
        runner, state = owners[future]
        runner.on_result(state)
    return True


def drive(runners: list[TrialRunner], poll_seconds: float = 0.5) -> None:
    """Run every runner's seeds to an end state, reacting to whichever result arrives first."""
    while drive_once(runners, poll_seconds):
        pass
