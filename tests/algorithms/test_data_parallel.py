"""Data-parallel training: 2 Ray workers under torch.distributed (gloo on CPU) train one VAE trial."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from labfleet.algorithms.generative import base
from labfleet.orchestration.runner import trial_bundles
from labfleet.orchestration.trial import TrialWorker
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


class DigestWorker(TrialWorker):
    def run(self) -> dict:
        final = None
        while not self.trainer.done:
            final = self.advance(60).final
        digests = (self.trainer.parameter_digest(), self.trainer.helper_digests()) if self.trainer.world > 1 else None
        return {"final": final, "digests": digests, "steps": self.trainer.steps}


def _train(ray, workers: int) -> dict:
    spec = load_spec(EXPERIMENTS / "digits_vae.yaml", {
        "budget.epochs": 30, "hparams.early_stopping": None, "hparams.iwae_samples": 1, "eval.every_steps": 10,
        "resources.data_parallel": workers, "resources.cpus_per_trial": 1})
    group = placement_group(trial_bundles(spec))
    ray.get(group.ready(), timeout=300)
    actor = ray.remote(DigestWorker).options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0)).remote(spec.model_dump(mode="json"), 0)
    try:
        return ray.get(actor.run.remote(), timeout=600)
    finally:
        ray.kill(actor)
        remove_placement_group(group)


@pytest.mark.slow
def test_two_workers_keep_identical_parameters_and_match_one_worker(ray_local):
    parallel = _train(ray_local, 2)
    rank0, (rank1,) = parallel["digests"]
    assert len(rank0) == len(rank1) > 0
    for a, b in zip(rank0, rank1, strict=True):
        assert np.array_equal(a, b), "the ranks' parameters diverged"
    single = _train(ray_local, 1)
    assert parallel["steps"] == single["steps"]  # the same optimiser steps: each rank takes half a batch
    p, s = parallel["final"]["eval/neg_elbo"], single["final"]["eval/neg_elbo"]
    assert abs(p - s) <= 0.1 * s, (p, s)


class SplitWorker(TrialWorker):
    def run(self, stop_at: int | None) -> dict:
        """Train to the end; with `stop_at`, stop there first, close everything (the helper ranks die too)
        and go on from the checkpoint in a new trainer, as a restarted seed does."""
        resumed = None
        if stop_at is not None:
            while self.trainer.progress < stop_at:
                self.trainer.train_iteration()
            checkpoint = self.trainer.checkpoint_bytes()
            self.load(self.spec.model_dump(mode="json"), self.trainer.seed, checkpoint)
            resumed = self.slot.resumed
        while not self.trainer.done:
            self.trainer.train_iteration()
        return {"digests": (self.trainer.parameter_digest(), self.trainer.helper_digests()), "resumed": resumed}


@pytest.mark.slow
def test_a_data_parallel_trial_resumes_exactly(ray_local):
    """Every rank's minibatch stream is in rank 0's checkpoint: restored, the trial ends with the parameters
    of an uninterrupted run, bit for bit."""
    spec = load_spec(EXPERIMENTS / "digits_vae.yaml", {
        "budget.epochs": 4, "hparams.early_stopping": None, "hparams.iwae_samples": 1,
        "resources.data_parallel": 2, "resources.cpus_per_trial": 1})
    results = []
    for stop_at in (None, 2):
        group = placement_group(trial_bundles(spec))
        ray_local.get(group.ready(), timeout=300)
        actor = ray_local.remote(SplitWorker).options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0)).remote(spec.model_dump(mode="json"), 0)
        try:
            results.append(ray_local.get(actor.run.remote(stop_at), timeout=600))
        finally:
            ray_local.kill(actor)
            remove_placement_group(group)
    uninterrupted, split = results
    assert split["resumed"] == "exact"
    (rank0, (rank1,)), (split0, (split1,)) = uninterrupted["digests"], split["digests"]
    for a, b in zip([*rank0, *rank1], [*split0, *split1], strict=True):
        assert np.array_equal(a, b), "the resumed trial ended with other parameters"


class DiesBeforeJoining(base.DataParallelRank):
    def join(self, init_method: str, backend: str) -> None:
        os._exit(1)  # as a SIGKILL between the helper's start and its join would


class StartWorker(TrialWorker):
    def start(self) -> tuple[str, float]:
        """Start the data-parallel group with a helper that dies before it joins."""
        base.RemoteDataParallelRank = ray.remote(DiesBeforeJoining)  # this worker process only
        started = time.monotonic()
        try:
            self.trainer._start_data_parallel()
        except Exception as exc:  # noqa: BLE001 (the test reads which)
            return type(exc).__name__, time.monotonic() - started
        return "started", time.monotonic() - started


@pytest.mark.slow
def test_a_helper_that_dies_before_joining_is_a_lost_rank_not_a_hang(ray_local):
    """Rank 0 waited in `init_process_group` for a dead helper until torch's timeout (30 min): the chaos soak
    hung when its kill landed there. Now Ray's own error comes at once, and the driver retries the seed."""
    spec = load_spec(EXPERIMENTS / "digits_vae.yaml", {
        "resources.data_parallel": 2, "resources.cpus_per_trial": 1})
    group = placement_group(trial_bundles(spec))
    ray.get(group.ready(), timeout=300)
    actor = ray.remote(StartWorker).options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0)).remote(spec.model_dump(mode="json"), 0)
    try:
        what, seconds = ray.get(actor.start.remote(), timeout=120)
    finally:
        ray.kill(actor)
        remove_placement_group(group)
    assert what in ("ActorDiedError", "RayActorError"), what
    assert seconds < 60, seconds
