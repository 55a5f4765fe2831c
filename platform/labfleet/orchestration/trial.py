"""The trial worker: one seed of one configuration, trained in chunks inside a Ray actor.

It is a plain class (tests drive it in-process); `runner.py` wraps it with `ray.remote`. Each `advance`
call trains for about `seconds` and returns everything the driver needs: metric records, progress, a
checkpoint (bytes, at every evaluation and at the end) and, once the budget is spent, the final
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
from labfleet.spec.models import ExperimentSpec


def eval_interval(spec: ExperimentSpec) -> int:
    return spec.eval.every_steps or max(1, spec.budget.total // 10)


class TrialWorker:
    def __init__(self, spec: dict[str, Any], seed: int, checkpoint: bytes | None = None):
        self.spec = ExperimentSpec.model_validate(spec)
        torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_trial)))
        self.device = resolve_device(self.spec.device)
        info = registry.get(self.spec.algorithm)
        self.trainer = info.trainer(self.spec, seed, self.device)
        if checkpoint is not None:
            self.trainer.restore_bytes(checkpoint)
        self.every = eval_interval(self.spec)
        self.next_eval = (self.trainer.progress // self.every + 1) * self.every

    def describe(self) -> dict[str, str]:
        node = ""
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"host": socket.gethostname(), "node_id": node, "pid": str(os.getpid()), "device": self.device}

    def advance(self, seconds: float = 1.0) -> dict[str, Any]:
        trainer = self.trainer
        records: list[tuple[int, dict[str, float]]] = []
        checkpoint = None
        started = time.perf_counter()
        while not trainer.done and time.perf_counter() - started < seconds:
            logged = trainer.train_iteration()
            bad = [k for k, v in logged.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite {', '.join(bad)} at step {trainer.metric_step}")
            if trainer.progress >= self.next_eval and not trainer.done:
                logged.update(trainer.evaluate())
                checkpoint = trainer.checkpoint_bytes()
                while self.next_eval <= trainer.progress:
                    self.next_eval += self.every
            records.append((trainer.metric_step, logged))
        final = None
        if trainer.done:
            final = trainer.evaluate()
            records.append((trainer.metric_step, final))
            checkpoint = trainer.checkpoint_bytes()
        return {"records": records, "progress": trainer.progress, "done": trainer.done,
                "checkpoint": checkpoint, "final": final}
