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
import time
from typing import Any

import torch

from labfleet.algorithms import registry
from labfleet.algorithms.base import resolve_device
from labfleet.algorithms.custom import FunctionTrainer
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


class TrialWorker:
    """Trains one seed at a time. A worker may be reused for the next trial (`load`, or `advance` with
    `load=`): its process, imports and placement group outlive the trainer (the actor pool of
    `runner.py`), which matters when trials are short."""

    def __init__(self, spec: dict[str, Any] | None = None, seed: int = 0, checkpoint: bytes | None = None):
        self.trainer: Any = None
        self.device = "cpu"
        if spec is not None:
            self.load(spec, seed, checkpoint)

    def load(self, spec: dict[str, Any], seed: int, checkpoint: bytes | None = None) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        self.spec = ExperimentSpec.model_validate(spec)
        torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_trial)))
        self.device = resolve_device(self.spec.device)
        info = registry.get(self.spec.algorithm)
        self.trainer = info.trainer(self.spec, seed, self.device)
        # How the next result says this load went: "exact" or "approximate" from a checkpoint (see
        # `Trainer.resume_exact`), None from scratch.
        self.resumed: str | None = None
        if checkpoint is not None:
            self.trainer.restore_bytes(checkpoint)
            self.resumed = "exact" if self.trainer.resume_exact else "approximate"
        self.every = eval_interval(self.spec)
        self.next_eval = (self.trainer.progress // self.every + 1) * self.every
        self.window = MetricWindow(self.spec.budget.total // CURVE_POINTS, start=self.trainer.progress)

    def describe(self) -> dict[str, str]:
        node = ""
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"host": socket.gethostname(), "node_id": node, "pid": str(os.getpid()), "device": self.device}

    def advance(self, seconds: float = 1.0, load: tuple[dict[str, Any], int, bytes | None] | None = None
                ) -> dict[str, Any]:
        """Train for about `seconds` (after loading a new trial first when `load` is given)."""
        if load is not None:
            self.load(*load)
        trainer = self.trainer
        records: list[tuple[int, dict[str, float]]] = []
        artifacts: dict[str, bytes] = {}  # images a generative trainer makes at its evaluations
        checkpoint, evaluated = None, False
        started = time.perf_counter()
        own_reports = isinstance(trainer, FunctionTrainer)  # a training function reports and evaluates itself
        while not trainer.done and time.perf_counter() - started < seconds:
            logged = trainer.train_iteration()
            bad = [k for k, v in logged.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite {', '.join(bad)} at step {trainer.metric_step}")
            if own_reports:
                if logged:
                    records.append((trainer.metric_step, logged))
                evaluated = evaluated or trainer.new_checkpoint  # its new checkpoint goes with this chunk
                continue
            closed = self.window.add(trainer.progress, trainer.metric_step, logged)
            if closed:
                records.append(closed)
            if trainer.progress >= self.next_eval and not trainer.done:
                records.append((trainer.metric_step, trainer.evaluate()))
                artifacts.update(self._media())
                evaluated = True
                while self.next_eval <= trainer.progress:
                    self.next_eval += self.every
        final = None
        if trainer.done:
            closed = self.window.flush(trainer.metric_step)
            if closed:
                records.append(closed)
            final = trainer.evaluate()
            records.append((trainer.metric_step, final))
            artifacts.update(self._media())
            artifacts.update(self._final_video())
        if evaluated or trainer.done:
            # Taken at the end of the chunk, not at the evaluation: a restart from it redoes no step that
            # this result logs (later chunks' steps it may redo are dropped by the driver: exactly once).
            checkpoint = trainer.checkpoint_bytes()
        resumed, self.resumed = self.resumed, None
        return {"records": records, "progress": trainer.progress, "done": trainer.done,
                "checkpoint": checkpoint, "final": final, "artifacts": artifacts, "resumed": resumed}

    def _final_video(self) -> dict[str, bytes]:
        """`eval.video`: one episode of the final greedy policy as an MP4 (RL trainers)."""
        if not self.spec.eval.video or self.spec.env is None or not hasattr(self.trainer, "greedy_actions"):
            return {}
        import tempfile
        from pathlib import Path

        from labfleet.playback import play

        with tempfile.TemporaryDirectory(prefix="labfleet-video-") as tmp:
            play(self.trainer, 1, Path(tmp), seed=self.trainer.seed)
            videos = sorted(Path(tmp).glob("*.mp4"))
            return {"videos/final.mp4": videos[0].read_bytes()} if videos else {}

    def _media(self) -> dict[str, bytes]:
        media = getattr(self.trainer, "media", None)
        return media() if media is not None else {}
