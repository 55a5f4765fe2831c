"""The array-stepped CartPole (rollout/classic.py) against gymnasium's own environments: every observation,
reward, termination, truncation and final observation the same to the bit, over episodes that end both
ways; its checkpoints, and gymnasium's, resume it exactly."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from labfleet.rollout.classic import CartPoleVector
from labfleet.rollout.envs import EnvMaker
from labfleet.rollout.sampler import VectorSampler


def _gymnasium(n: int) -> gym.vector.VectorEnv:
    return gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="sync", disable_env_checker=True,
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})


def _actions(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Even environments balance the pole (episodes run into the 500-step limit), odd ones act at random
    (episodes end in a terminal state)."""
    balance = (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)
    random = rng.integers(0, 2, len(obs))
    return np.where(np.arange(len(obs)) % 2 == 0, balance, random)


def _same_steps(ours: gym.vector.VectorEnv, theirs: gym.vector.VectorEnv, steps: int, seed: int,
                obs: np.ndarray) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    ends = [0, 0]
    for _ in range(steps):
        actions = _actions(obs, rng)
        a, b = ours.step(actions), theirs.step(actions)
        for x, y in zip(a[:4], b[:4], strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert set(a[4]) == set(b[4])
        if "final_obs" in b[4]:
            assert np.array_equal(a[4]["_final_obs"], b[4]["_final_obs"])
            for i in np.flatnonzero(b[4]["_final_obs"]):
                assert np.array_equal(a[4]["final_obs"][i], b[4]["final_obs"][i])
        ends[0] += int(a[2].sum())
        ends[1] += int(a[3].sum())
        obs = a[0]
    return ends[0], ends[1]


@pytest.mark.parametrize("seed", [0, 123457])
def test_cartpole_steps_as_gymnasium_does_to_the_bit(seed):
    n = 8
    ours, theirs = CartPoleVector(n), _gymnasium(n)
    seeds = [seed * 10 + i for i in range(n)]
    obs, _ = ours.reset(seed=seeds)
    reference, _ = theirs.reset(seed=seeds)
    assert obs.dtype == reference.dtype and np.array_equal(obs, reference)
    terminated, truncated = _same_steps(ours, theirs, 2500, seed, obs)
    assert terminated > 50 and truncated >= 4  # both kinds of episode end were compared
    assert ours.single_observation_space == theirs.single_observation_space
    assert ours.single_action_space == theirs.single_action_space
    int_seeded = CartPoleVector(3).reset(seed=7)[0]
    assert np.array_equal(int_seeded, _gymnasium(3).reset(seed=7)[0])


def test_the_sampler_gets_it_only_for_plain_cartpole():
    assert isinstance(EnvMaker("CartPole-v1").make_vector(2), CartPoleVector)
    for maker in (EnvMaker("CartPole-v1", {"max_episode_steps": 100}), EnvMaker("Acrobot-v1"),
                  EnvMaker("CartPole-v1", wrappers=(("TimeAwareObservation", {}, False),))):
        assert not isinstance(maker.make_vector(2), CartPoleVector)


class _Gymnasium(EnvMaker):
    """CartPole-v1 on gymnasium's own environments (the reference)."""

    def make_vector(self, n_envs: int, evaluation: bool = False) -> gym.vector.VectorEnv:
        return _gymnasium(n_envs)


def _policy():
    class Policy:
        noise_dim = 1

        def transform_noise(self, uniforms):
            return uniforms

        def __call__(self, obs, noise):
            return np.where(noise[:, 0] < 0.3, (obs[:, 2] + 0.5 * obs[:, 3] > 0), noise[:, 0] > 0.65).astype(np.int64)

    return Policy()


@pytest.mark.parametrize("saved_by", ["ours", "gymnasium"])
def test_a_checkpointed_sampler_resumes_exactly(saved_by):
    """A sampler saved mid-episode (by this vector env, or by gymnasium's environments, as in a checkpoint
    of an earlier version) and restored into a fresh one goes on as the one never stopped, to the bit."""
    policy = _policy()
    maker = EnvMaker("CartPole-v1")
    saver = VectorSampler(maker if saved_by == "ours" else _Gymnasium("CartPole-v1"), 4, seed=3)
    saver.collect(policy, 300)
    state = saver.get_state()
    assert state is not None
    halves = VectorSampler.split_state(state, 2)
    restored = [VectorSampler(maker, 2, seed=3, first_env=2 * k, state=half) for k, half in enumerate(halves)]
    after = saver.collect(policy, 400)
    parts = [sampler.collect(policy, 400) for sampler in restored]
    for name in ("obs", "actions", "rewards", "terminated", "truncated", "next_obs"):
        assert np.array_equal(getattr(after, name), np.concatenate([getattr(p, name) for p in parts], axis=1)), name
    assert after.episode_returns and sorted(after.episode_returns) == sorted(
        r for p in parts for r in p.episode_returns)
