"""Ray rollout actors: each steps its share of a trial's environments and returns whole rollouts (and evolution
strategies' perturbation workers, `PerturbationWorkerGroup`: rollout/perturbations.py says how they split
the work). Nothing else imports Ray for a trial: a trial without workers runs without it.

Worker w of W steps environments w*k .. (w+1)*k - 1 (k = n_envs / W) with the same per-index seeds as the
in-process sampler, so the number of workers changes speed, not results. The policy travels once as an
object at creation; each iteration its parameters are `ray.put` once by the trial and the same reference is
passed to every worker. Workers are placed in the bundles 1..W of the trial's placement group when the
trial runs in one, and are owned by the trial actor, so they die with it.

A sampling policy (see `NoisePolicy`) works with workers when it also has `get_state()` (small, picklable,
CPU), `set_state(state)` and `to_cpu()`. Workers receive a CPU copy of the policy (`cpu_copy`) and hold no
GPU, so a trial on CUDA opens no CUDA context in its rollout workers.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

from labfleet.rollout.envs import EnvMaker
from labfleet.rollout.perturbations import PerturbationEvaluator
from labfleet.rollout.sampler import Rollout, VectorSampler


def worker_options(index: int, cpus: float) -> dict[str, Any]:
    """Ray options of the trial's worker `index` (0-based): its CPUs, and bundle index + 1 of the trial's
    placement group when the trial runs in one (bundle 0 is the trial actor's own)."""
    options: dict[str, Any] = {"num_cpus": cpus}
    group = ray.util.get_current_placement_group()
    if group is not None and len(group.bundle_specs) > index + 1:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index + 1)
    return options


def cpu_copy(policy: Any) -> Any:
    """The policy as workers receive it: a copy on the CPU, so that unpickling it opens no CUDA context."""
    import copy

    cpu = copy.deepcopy(policy)
    cpu.to_cpu()
    return cpu


class RolloutWorker:
    def __init__(self, maker: EnvMaker, n_envs: int, seed: int, first_env: int, generation: int,
                 policy_blob: bytes, state: dict[str, Any] | None = None):
        import torch

        from labfleet.algorithms.base import held_gpus, hide_gpus_unless_held

        hide_gpus_unless_held(held_gpus())  # it steps environments on the CPU and opens no CUDA context
        torch.set_num_threads(1)
        self.sampler = VectorSampler(maker, n_envs, seed, first_env=first_env, generation=generation, state=state)
        self.policy = pickle.loads(policy_blob)
        self.policy.to_cpu()

    def collect(self, policy_state: Any, n_steps: int) -> Rollout:
        self.policy.set_state(policy_state)
        return self.sampler.collect(self.policy, n_steps)

    def get_state(self) -> dict[str, Any] | None:
        return self.sampler.get_state()


RemoteRolloutWorker = ray.remote(RolloutWorker)


class RolloutWorkerGroup:
    """The trial's W rollout actors; `collect` gathers one rollout from each, in environment order."""

    def __init__(self, maker: EnvMaker, n_envs: int, n_workers: int, seed: int, generation: int, policy: Any,
                 cpus_per_worker: float, state: dict[str, Any] | None = None):
        if n_envs % n_workers:
            raise ValueError(f"n_envs ({n_envs}) must be a multiple of rollout_workers ({n_workers})")
        per_worker = n_envs // n_workers
        blob = pickle.dumps(cpu_copy(policy))
        parts = VectorSampler.split_state(state, n_workers) if state is not None else [None] * n_workers
        self.workers: list[Any] = [  # actor handles
            RemoteRolloutWorker.options(**worker_options(w, cpus_per_worker)).remote(
                maker, per_worker, seed, w * per_worker, generation, blob, parts[w]) for w in range(n_workers)]

    def collect(self, policy: Any, n_steps: int) -> Rollout:
        state = ray.put(policy.get_state())  # once per iteration, shared by every worker
        return Rollout.concatenate(ray.get([w.collect.remote(state, n_steps) for w in self.workers]))

    def get_state(self) -> dict[str, Any] | None:
        """The environments' state, in environment order, as one `VectorSampler` state (None: unsaveable)."""
        return VectorSampler.join_states(ray.get([w.get_state.remote() for w in self.workers]))

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


class PerturbationWorker(PerturbationEvaluator):
    def __init__(self, *args: Any, **kwargs: Any):
        torch.set_num_threads(1)
        super().__init__(*args, **kwargs)


RemotePerturbationWorker = ray.remote(PerturbationWorker)


class PerturbationWorkerGroup:
    """W Ray actors sharing one noise table; `evaluate` deals whole chunks out to them in turn and puts the
    results back in perturbation order."""

    def __init__(self, maker: EnvMaker, policy: nn.Module, noise: np.ndarray, chunk: int, n_workers: int,
                 cpus_per_worker: float):
        noise_ref = ray.put(noise)  # once: every worker maps this copy
        self.chunk = chunk
        self.workers: list[Any] = [RemotePerturbationWorker.options(**worker_options(w, cpus_per_worker)).remote(
            maker, policy, noise_ref, chunk) for w in range(n_workers)]

    def evaluate(self, theta: np.ndarray, offsets: np.ndarray, signs: np.ndarray, sigma: float,
                 seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        theta_ref = ray.put(theta)  # once per iteration, shared by every worker
        starts = list(range(0, len(offsets), self.chunk))
        calls = []
        for c, start in enumerate(starts):
            part = slice(start, start + self.chunk)
            worker = self.workers[c % len(self.workers)]
            calls.append(worker.evaluate.remote(theta_ref, offsets[part], signs[part], sigma, seeds[part]))
        results = ray.get(calls)
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
