"""The trial worker: one seed of one configuration, trained in chunks inside a Ray actor.

It is a plain class (tests drive it in-process); `runner.py` wraps it with `ray.remote`. Each `advance`
call trains for about `seconds` and returns everything the driver needs: metric records, progress, a
checkpoint (bytes, at the end of every chunk that evaluated, and at the end) and, once the budget is spent, the final
evaluation. Nothing is written to disk here: results travel through Ray to the driver.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from labfleet.algorithms import registry
from labfleet.algorithms.base import held_gpus, resolve_device
from labfleet.algorithms.custom import FunctionTrainer
from labfleet.orchestration.wire import GroupChunk, Record, SeedChunk, SeedFailed
from labfleet.spec.models import ExperimentSpec

CURVE_POINTS = 500  # training metrics are averaged over windows of budget / CURVE_POINTS units


def eval_interval(spec: ExperimentSpec) -> int:
    return spec.eval.every_steps or max(1, spec.budget.total // 10)


class MetricWindow:
    """Averages training metrics over windows of `width` budget units, so that a run of 20k iterations
    logs a few hundred points per curve, not 20k. Counters (`time/...`) keep their last value."""

    def __init__(self, width: int, start: int = 0):
        self.width = max(1, width)
        self.start = start  # progress when the window opened
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def add(self, progress: int, step: int, values: dict[str, float]) -> tuple[int, dict[str, float]] | None:
        """Add one iteration's metrics; returns (metric step, window means) when the window closes."""
        for key, value in values.items():
            if key.startswith("time/"):
                self.last[key] = value
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        if progress - self.start < self.width:
            return None
        self.start = progress
        return self.flush(step)

    def flush(self, step: int) -> tuple[int, dict[str, float]] | None:
        if not self.sums and not self.last:
            return None
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        means.update(self.last)
        self.sums, self.counts, self.last = {}, {}, {}
        return step, means


class SeedSlot:
    """The bookkeeping of one seed in a trial actor: its metric window, its next evaluation, and how its
    last load went ("exact" or "approximate" from a checkpoint, see `Trainer.resume_exact`; None from
    scratch), which the next result reports once."""

    def __init__(self, spec: ExperimentSpec, trainer: Any, resumed: str | None):
        self.every = eval_interval(spec)
        self.next_eval = (trainer.progress // self.every + 1) * self.every
        self.window = MetricWindow(spec.budget.total // CURVE_POINTS, start=trainer.progress)
        self.resumed = resumed
        self.reported = False  # (groups) its end, done or failed, went to the driver: it is no longer trained

    def eval_due(self, trainer: Any) -> bool:
        """Whether the trainer has reached its next evaluation (the one at the end is separate); moves the
        next one past its progress."""
        if trainer.done or trainer.progress < self.next_eval:
            return False
        while self.next_eval <= trainer.progress:
            self.next_eval += self.every
        return True

    def take_resumed(self) -> str | None:
        resumed, self.resumed = self.resumed, None
        return resumed


def non_finite(logged: dict[str, float], step: int) -> FloatingPointError | None:
    bad = [k for k, v in logged.items() if not math.isfinite(v)]
    return FloatingPointError(f"non-finite {', '.join(bad)} at step {step}") if bad else None


def actor_device(requested: str) -> str:
    """The device of a trial in a Ray actor: CUDA only where Ray gave the actor a GPU (`resolve_device`)."""
    return resolve_device(requested, held_gpus())


def describe_process(device: str) -> dict[str, str]:
    """Where a trial actor runs: host, Ray node, process, device."""
    node = ""
    ray = sys.modules.get("ray")  # a trial in a Ray actor; in the driver (in-process), Ray is not imported
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    return {"host": socket.gethostname(), "node_id": node, "pid": str(os.getpid()), "device": device}


class TrialWorker:
    """Trains one seed at a time. A worker may be reused for the next trial (`load`, or `advance` with
    `load=`): its process, imports and placement group outlive the trainer (the actor pool of
    `runner.py`), which matters when trials are short."""

    def __init__(self, spec: dict[str, Any] | None = None, seed: int = 0, checkpoint: bytes | None = None, *,
                 device_of: Callable[[str], str] | None = None):
        self.trainer: Any = None
        self.device = "cpu"
        self.device_of = device_of or actor_device
        if spec is not None:
            self.load(spec, seed, checkpoint)

    def load(self, spec: dict[str, Any], seed: int, checkpoint: bytes | None = None) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        self.spec = ExperimentSpec.model_validate(spec)
        torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_trial)))
        self.device = self.device_of(self.spec.device)
        info = registry.get(self.spec.algorithm)
        self.trainer = info.trainer(self.spec, seed, self.device)
        resumed = None
        if checkpoint is not None:
            self.trainer.restore_bytes(checkpoint)
            resumed = "exact" if self.trainer.resume_exact else "approximate"
        self.slot = SeedSlot(self.spec, self.trainer, resumed)

    def describe(self) -> dict[str, str]:
        return describe_process(self.device)

    def advance(self, seconds: float = 1.0, load: tuple[dict[str, Any], int, bytes | None] | None = None
                ) -> SeedChunk:
        """Train for about `seconds` (after loading a new trial first when `load` is given)."""
        if load is not None:
            self.load(*load)
        trainer = self.trainer
        records: list[Record] = []
        artifacts: dict[str, bytes] = {}  # images a generative trainer makes at its evaluations
        evaluated = False
        started = time.perf_counter()
        while not trainer.done and time.perf_counter() - started < seconds:
            evaluated = self._iterate(records, artifacts) or evaluated
        final = self._final(records, artifacts) if trainer.done else None
        # Taken at the end of the chunk, not at the evaluation: a restart from it redoes no step that this
        # result logs (later chunks' steps it may redo are dropped by the driver: exactly once).
        checkpoint = trainer.checkpoint_bytes() if evaluated or trainer.done else None
        return SeedChunk(records, trainer.progress, trainer.done, checkpoint, final, artifacts,
                         self.slot.take_resumed(), time.perf_counter() - started)

    def _iterate(self, records: list[Record], artifacts: dict[str, bytes]) -> bool:
        """One training iteration: its metrics into the window, and the evaluation that is due, if any; a
        training function reports and evaluates itself. Whether a checkpoint goes with this chunk."""
        trainer = self.trainer
        logged = trainer.train_iteration()
        if (error := non_finite(logged, trainer.metric_step)) is not None:
            raise error
        if isinstance(trainer, FunctionTrainer):
            if logged:
                records.append((trainer.metric_step, logged))
            artifacts.update(trainer.take_artifacts())  # what the function logged with ctx.log_artifact
            return bool(trainer.new_checkpoint)  # its new checkpoint goes with this chunk
        closed = self.slot.window.add(trainer.progress, trainer.metric_step, logged)
        if closed:
            records.append(closed)
        if not self.slot.eval_due(trainer):
            return False
        records.append((trainer.metric_step, trainer.evaluate()))
        artifacts.update(self._media())
        return True

    def _final(self, records: list[Record], artifacts: dict[str, bytes]) -> dict[str, float]:
        """The last window and the final evaluation, with its media and video."""
        trainer = self.trainer
        closed = self.slot.window.flush(trainer.metric_step)
        if closed:
            records.append(closed)
        final = trainer.evaluate()
        records.append((trainer.metric_step, final))
        artifacts.update(self._media())
        artifacts.update(self._final_video())
        return final

    def _final_video(self) -> dict[str, bytes]:
        return final_video(self.spec, self.trainer)

    def _media(self) -> dict[str, bytes]:
        return trainer_media(self.trainer)


def final_video(spec: ExperimentSpec, trainer: Any) -> dict[str, bytes]:
    """`eval.video`: one episode of the final greedy policy as an MP4 (RL trainers)."""
    if not spec.eval.video or spec.env is None or not hasattr(trainer, "greedy_actions"):
        return {}
    import tempfile
    from pathlib import Path

    from labfleet.playback import play

    with tempfile.TemporaryDirectory(prefix="labfleet-video-") as tmp:
        play(trainer, 1, Path(tmp), seed=trainer.seed)
        videos = sorted(Path(tmp).glob("*.mp4"))
        return {"videos/final.mp4": videos[0].read_bytes()} if videos else {}


def trainer_media(trainer: Any) -> dict[str, bytes]:
    media = getattr(trainer, "media", None)
    return media() if media is not None else {}


class TrialWorkerGroup:
    """`resources.seeds_per_actor`: several seeds in one actor (seedgroup.py says how they train together),
    of one trial, or of several trials of a sweep (`sweep.share_actors`), each member with its own spec.

    Members are keyed: by their seed (`load(spec, seeds, checkpoints)`), or by the driver's own keys
    (`load(specs, [(key, spec index, seed), ...], checkpoints by key)`). `advance` returns a `GroupChunk`:
    each member's `SeedChunk`, as `TrialWorker.advance` gives it, or a `SeedFailed` for a member whose trainer
    could not be built or restored, raised, or produced a non-finite metric: that member fails alone (in a
    shared actor, the other trials' seeds go on). `drop` (keys) takes members out first (a
    pruned trial's)."""

    def __init__(self, spec: dict[str, Any] | list[dict[str, Any]] | None = None, seeds: list[Any] | None = None,
                 checkpoints: dict[int, bytes | None] | None = None, *, device_of: Callable[[str], str] | None = None):
        self.group: Any = None
        self.device = "cpu"
        self.device_of = device_of or actor_device
        if spec is not None:
            self.load(spec, seeds or [], checkpoints)

    def load(self, spec: dict[str, Any] | list[dict[str, Any]], seeds: list[Any],
             checkpoints: dict[int, bytes | None] | None = None) -> None:
        from labfleet.algorithms.seedgroup import build_group

        if self.group is not None:
            self.group.close()
            self.group = None
        if isinstance(spec, dict):  # the seeds of one trial, keyed by seed
            specs, members_of = [ExperimentSpec.model_validate(spec)], [(seed, 0, seed) for seed in seeds]
        else:
            specs, members_of = [ExperimentSpec.model_validate(s) for s in spec], [tuple(m) for m in seeds]
        self.spec = specs[0]  # (every member's resources, device and algorithm are the same)
        torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_trial)))
        self.device = self.device_of(self.spec.device)
        info = registry.get(self.spec.algorithm)
        members, self.slots, self.specs = {}, {}, {}
        self.failed: dict[int, str] = {}  # members that could not be built or restored, reported once
        for key, index, seed in members_of:
            member_spec = specs[index]
            trainer = None
            try:
                trainer = info.trainer(member_spec, seed, self.device)
                checkpoint = (checkpoints or {}).get(key)
                resumed = None
                if checkpoint is not None:
                    trainer.restore_bytes(checkpoint)
                    resumed = "exact" if trainer.resume_exact else "approximate"
            except Exception as exc:  # this member fails; the others train
                if trainer is not None:
                    trainer.close()
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                continue
            members[key] = trainer
            self.specs[key] = member_spec
            self.slots[key] = SeedSlot(member_spec, trainer, resumed)
        self.group = build_group(info.name, members)

    def describe(self) -> dict[str, str]:
        return describe_process(self.device)

    def advance(self, seconds: float = 1.0, load: tuple[Any, list[Any], dict[int, bytes | None]] | None = None,
                drop: list[int] | None = None) -> GroupChunk:
        if load is not None:
            self.load(*load)
        for key in drop or ():
            if key in self.group.members:
                self.group.drop(key)
                self.slots[key].reported = True
        group, slots = self.group, self.slots
        out: dict[int, SeedChunk | SeedFailed] = {key: SeedFailed(text) for key, text in self.failed.items()}
        self.failed = {}
        records: dict[int, list[Record]] = {seed: [] for seed in group.members}
        artifacts: dict[int, dict[str, bytes]] = {seed: {} for seed in group.members}
        evaluated: set[int] = set()
        started = time.perf_counter()
        while group.live() and time.perf_counter() - started < seconds:
            self._iterate(out, records)
            due = [seed for seed, trainer in group.members.items() if slots[seed].eval_due(trainer)]
            if due:
                group.sync()  # (a batched group's members hold their state only after a sync)
            for seed in due:
                trainer = group.members[seed]
                records[seed].append((trainer.metric_step, trainer.evaluate()))
                artifacts[seed].update(trainer_media(trainer))
                evaluated.add(seed)
        if evaluated or any(t.done and not slots[seed].reported for seed, t in group.members.items()):
            group.sync()  # for the checkpoints and final evaluations below
        for seed in group.members:
            if not slots[seed].reported:
                out[seed] = self._chunk(seed, records[seed], artifacts[seed], seed in evaluated, started)
        return GroupChunk(out)

    def _chunk(self, seed: int, records: list[Record], artifacts: dict[str, bytes], evaluated: bool,
               started: float) -> SeedChunk:
        """One member's part of the result: with its final evaluation once it is done."""
        trainer, slot = self.group.members[seed], self.slots[seed]
        final = None
        if trainer.done:
            closed = slot.window.flush(trainer.metric_step)
            if closed:
                records.append(closed)
            final = trainer.evaluate()
            records.append((trainer.metric_step, final))
            artifacts.update(trainer_media(trainer))
            artifacts.update(final_video(self.specs[seed], trainer))
            slot.reported = True
        checkpoint = trainer.checkpoint_bytes() if evaluated or trainer.done else None
        return SeedChunk(records, trainer.progress, trainer.done, checkpoint, final, artifacts, slot.take_resumed(),
                         time.perf_counter() - started)

    def _iterate(self, out: dict[int, SeedChunk | SeedFailed], records: dict[int, list[Record]]) -> None:
        """One iteration of the group: each seed's metrics into its window, or its error into `out`."""
        group, slots = self.group, self.slots
        for seed, logged in group.train_iteration().items():
            trainer = group.members[seed]
            if not isinstance(logged, BaseException):
                logged = non_finite(logged, trainer.metric_step) or logged
            if isinstance(logged, BaseException):
                out[seed] = SeedFailed(f"{type(logged).__name__}: {logged}")
                slots[seed].reported = True
                group.drop(seed)
                continue
            closed = slots[seed].window.add(trainer.progress, trainer.metric_step, logged)
            if closed:
                records[seed].append(closed)
