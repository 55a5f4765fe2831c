"""Ray rollout workers: W = 0, 1, 2 give the same rollouts and the same learning, on a real local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.networks import NumpyPolicy, make_policy
from labfleet.rollout.envs import EnvMaker, make_env
from labfleet.rollout.sampler import VectorSampler
from labfleet.rollout.workers import RolloutWorkerGroup
from labfleet.spec.loading import load_spec
from tests.conftest import shipped_spec_for

ROLLOUT_FIELDS = ("obs", "actions", "rewards", "terminated", "truncated", "next_obs")


def _policy() -> NumpyPolicy:
    env = make_env("CartPole-v1")
    torch.manual_seed(0)
    return NumpyPolicy(make_policy(env.observation_space, env.action_space, [16], "tanh"), torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize(("n_workers", "backend"), [(1, "gymnasium"), (2, "gymnasium"), (2, "envpool")])
def test_workers_return_the_in_process_rollouts(ray_local, n_workers, backend):
    policy = _policy()
    maker = EnvMaker("CartPole-v1", backend=backend)
    local = VectorSampler(maker, 4, seed=11)
    group = RolloutWorkerGroup(maker, 4, n_workers, seed=11, generation=0, policy=policy, cpus_per_worker=0.5)
    try:
        for _ in range(3):  # the policy changes between rollouts; workers must follow it
            expected, got = local.collect(policy, 50), group.collect(policy, 50)
            for name in ROLLOUT_FIELDS:
                np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-6, err_msg=name)
            assert sorted(got.episode_returns) == sorted(expected.episode_returns)
            with torch.no_grad():
                for p in policy.policy.parameters():
                    p.add_(0.05)
    finally:
        group.close()


# PPO and DQN run with running observation and reward normalisation (issue 13): its statistics are
# merged by the trainer from whole rollouts, so they too must not depend on the worker count.
SMALL = {
    "ppo": {"hparams.n_envs": 2, "hparams.n_steps": 32, "hparams.batch_size": 32, "hparams.normalize": True},
    "dqn": {"hparams.n_envs": 2, "hparams.learning_starts": 64, "hparams.train_freq": 32,
            "hparams.gradient_steps": 4, "hparams.batch_size": 32, "hparams.normalize": True},
    "qlearning": {"hparams.n_envs": 2, "hparams.n_steps": 16},
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(SMALL))
def test_number_of_workers_changes_speed_not_results(ray_local, algorithm):
    results = {}
    for workers in (0, 1, 2):
        spec = load_spec(shipped_spec_for(algorithm), {**SMALL[algorithm], "budget.env_steps": 10_000,
                                                       "resources.rollout_workers": workers,
                                                       "resources.cpus_per_worker": 0.5})
        trainer = registry.get(algorithm).trainer(spec, 0, "cpu")
        metrics = [trainer.train_iteration() for _ in range(6)]
        stats = [] if trainer.obs_normalizer is None else [
            trainer.obs_normalizer.rms.mean.numpy().copy(), trainer.obs_normalizer.rms.var.numpy().copy(),
            trainer.reward_scaler.rms.var.numpy().copy()]
        results[workers] = (metrics, trainer.probe(), stats)
        trainer.close()
    assert (algorithm == "qlearning") == (not results[0][2]), "normalisation is on for the deep learners"
    for workers in (1, 2):
        for a, b in zip(results[0][2], results[workers][2], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        for a, b in zip(results[0][0], results[workers][0], strict=True):
            for key in a:
                if key != "time/sps":
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (workers, key)
        np.testing.assert_array_equal(results[0][1], results[workers][1])


@pytest.mark.slow
def test_workers_must_divide_environments(ray_local):
    with pytest.raises(ValueError, match="multiple of rollout_workers"):
        RolloutWorkerGroup(EnvMaker("CartPole-v1"), 3, 2, seed=0, generation=0, policy=_policy(), cpus_per_worker=0.5)
