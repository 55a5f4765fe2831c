"""Environment state in checkpoints (issue 14 section 2): a restored environment steps exactly as the
original would, through `torch.load(weights_only=True)`; what cannot be saved says so, and a trainer on it
resumes approximately, tagged as such."""

from __future__ import annotations

import io
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

from labfleet import testing
from labfleet.algorithms import registry
from labfleet.rollout import envstate
from labfleet.rollout.envs import EnvMaker
from labfleet.rollout.sampler import VectorSampler
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

WRAPPED = (("NormalizeObservation", {}, False), ("FrameStackObservation", {"stack_size": 3}, False),
           ("NormalizeReward", {"gamma": 0.99}, True))
MAKERS = {
    "cartpole": EnvMaker("CartPole-v1"),
    "pendulum": EnvMaker("Pendulum-v1"),
    "frozenlake": EnvMaker("FrozenLake-v1", {"map_name": "8x8"}),
    "taxi": EnvMaker("Taxi-v4"),
    "hopper": EnvMaker("Hopper-v5"),
    "cartpole+stateful wrappers": EnvMaker("CartPole-v1", {}, WRAPPED),
}


def _through_torch(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def _trajectory(env: gym.Env, actions: list) -> list:
    out = []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        out.append((np.asarray(obs).copy(), float(reward), terminated, truncated))
        if terminated or truncated:
            out.append(np.asarray(env.reset()[0]).copy())  # reset draws from the env's own generator
    return out


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_restored_env_steps_exactly_as_the_original(name):
    maker = MAKERS[name]
    original = maker.make()
    original.reset(seed=1)
    original.action_space.seed(2)
    actions = [original.action_space.sample() for _ in range(400)]
    _trajectory(original, actions[:150])  # mid-episode, with episodes behind it
    assert envstate.saveable(original)
    state = _through_torch(envstate.snapshot(original))
    restored = maker.make()
    restored.reset(seed=99)  # another episode entirely, overwritten by the restore
    envstate.restore(restored, state)
    expected, got = _trajectory(original, actions[150:]), _trajectory(restored, actions[150:])
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        if isinstance(a, tuple):
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1:] == b[1:]
        else:
            np.testing.assert_array_equal(a, b)


class Plain(gym.Env):
    """A user's env that does not opt in: its state cannot be known to be complete."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(1, self.np_random.uniform(-1, 1), np.float32), 1.0, self.t >= 20, False, {}


class OptedIn(Plain):
    def get_env_state(self):
        return {"t": self.t, "rng": self.np_random.bit_generator.state["state"]["state"]}

    def set_env_state(self, state):
        self.t = state["t"]
        generator = self.np_random.bit_generator.state
        generator["state"]["state"] = state["rng"]
        self.np_random.bit_generator.state = generator


@pytest.fixture
def user_envs(monkeypatch):
    module = types.ModuleType("labfleet_test_user_envs")
    module.Plain, module.OptedIn = Plain, OptedIn
    Plain.__module__ = OptedIn.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    yield module.__name__
    for env_id in [k for k in gym.registry if module.__name__ in k]:  # EnvMaker registered them: leave no trace
        del gym.registry[env_id]


def test_what_cannot_be_saved_says_so(user_envs):
    plain = EnvMaker(f"{user_envs}:Plain").make()
    plain.reset(seed=0)
    assert not envstate.saveable(plain) and envstate.snapshot(plain) is None
    opted = EnvMaker(f"{user_envs}:OptedIn").make()
    opted.reset(seed=0)
    assert envstate.saveable(opted) and envstate.snapshot(opted) is not None
    # a user's wrapper is not assumed complete either, around an env that is
    wrapped = gym.wrappers.TransformReward(EnvMaker("CartPole-v1").make(), lambda r: r)
    assert envstate.saveable(wrapped)
    wrapped.__class__ = type("UserWrapper", (gym.wrappers.TransformReward,), {"__module__": user_envs})
    assert envstate.snapshot(wrapped) is None


def test_restoring_into_another_wrapper_chain_is_refused():
    state = envstate.snapshot(MAKERS["cartpole+stateful wrappers"].make())
    with pytest.raises(ValueError, match="another wrapper chain"):
        envstate.restore(MAKERS["cartpole"].make(), state)


def test_sampler_state_splits_and_joins_in_environment_order():
    one = VectorSampler(MAKERS["cartpole"], 4, seed=3)
    state = one.get_state()
    parts = VectorSampler.split_state(state, 2)
    assert [len(p["envs"]) for p in parts] == [2, 2]
    joined = VectorSampler.join_states(parts)
    assert joined["action_rngs"] == state["action_rngs"] and torch.equal(joined["obs"], state["obs"])
    assert VectorSampler.join_states([parts[0], None]) is None


def _ppo(env: str):
    spec = load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {
        "env": env, "hparams.n_envs": 2, "hparams.n_steps": 16, "hparams.batch_size": 16,
        "hparams.net_arch": [16], "budget.env_steps": 256, "eval.episodes": 2})
    return lambda: registry.get("ppo").trainer(spec, 0, "cpu")


def test_a_trainer_on_an_env_that_cannot_be_saved_resumes_approximately_and_reproducibly(user_envs):
    build = _ppo(f"{user_envs}:Plain")
    trainer = build()
    trainer.train_iteration()
    data = trainer.checkpoint_bytes()
    assert torch.load(io.BytesIO(data), weights_only=True)["rl"]["exact"] is False
    first, second = build(), build()
    first.restore_bytes(data)
    second.restore_bytes(data)
    assert not first.resume_exact
    assert testing.without_timing(first.train_iteration()) == testing.without_timing(second.train_iteration())
    np.testing.assert_array_equal(first.probe(), second.probe())
    # and a trainer restored approximately stays approximate in its own next checkpoint
    third = build()
    third.restore_bytes(first.checkpoint_bytes())
    assert not third.resume_exact


def test_a_user_env_that_opts_in_resumes_exactly(user_envs):
    build = _ppo(f"{user_envs}:OptedIn")
    testing.check_exact_resume(lambda seed: build())
    trainer = build()
    trainer.train_iteration()
    restored = build()
    restored.restore_bytes(trainer.checkpoint_bytes())
    assert restored.resume_exact
