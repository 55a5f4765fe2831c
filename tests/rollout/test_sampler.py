"""The sampler seam: an environment's stream depends on (seed, env index), not on how envs are grouped."""

from __future__ import annotations

import numpy as np
import torch

from labfleet.algorithms.rl.networks import NumpyPolicy, make_policy
from labfleet.rollout.envs import EnvMaker, make_env
from labfleet.rollout.sampler import Rollout, VectorSampler, evaluate_policy


def _policy(env_id: str) -> NumpyPolicy:
    env = make_env(env_id)
    torch.manual_seed(0)
    return NumpyPolicy(make_policy(env.observation_space, env.action_space, [16], "tanh"), torch.device("cpu"))


def test_grouping_of_environments_does_not_change_rollouts():
    policy = _policy("CartPole-v1")
    whole = VectorSampler(EnvMaker("CartPole-v1"), 4, seed=7).collect(policy, 100)
    parts = [VectorSampler(EnvMaker("CartPole-v1"), 2, seed=7, first_env=i).collect(policy, 100) for i in (0, 2)]
    joined = Rollout.concatenate(parts)
    for name in ("obs", "actions", "rewards", "terminated", "truncated", "next_obs"):
        np.testing.assert_allclose(getattr(whole, name), getattr(joined, name), rtol=1e-6, err_msg=name)
    assert sorted(whole.episode_returns) == sorted(joined.episode_returns)


def test_final_observation_is_kept_where_an_episode_ends():
    policy = _policy("CartPole-v1")
    rollout = VectorSampler(EnvMaker("CartPole-v1"), 2, seed=1).collect(policy, 200)
    t, i = np.argwhere(rollout.terminated)[0]
    assert not np.allclose(rollout.next_obs[t, i], rollout.obs[t + 1, i])  # obs[t+1] is a reset
    assert abs(rollout.next_obs[t, i][2]) > 0.2 or abs(rollout.next_obs[t, i][0]) > 2.4  # pole fell / cart left
    assert rollout.episode_returns and rollout.steps == 400


def test_truncation_is_flagged_separately():
    rollout = VectorSampler(EnvMaker("Pendulum-v1"), 1, seed=0).collect(_policy("Pendulum-v1"), 210)
    assert rollout.truncated[199, 0] and not rollout.terminated.any()
    assert rollout.episode_lengths == [200]


def test_evaluation_is_seeded_per_episode():
    act = _policy("CartPole-v1").greedy
    a = evaluate_policy(EnvMaker("CartPole-v1"), act, 5, seed=3, max_envs=2)
    b = evaluate_policy(EnvMaker("CartPole-v1"), act, 5, seed=3, max_envs=5)
    np.testing.assert_array_equal(a, b)
