"""`env_backend: envpool`: EnvPool's environments step as gymnasium's do, behind the samplers' vector-env
semantics (same-step autoreset, a seed per environment), and specs that cannot use it are refused."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from labfleet.algorithms.rl.networks import NumpyPolicy, make_policy
from labfleet.errors import SpecError
from labfleet.rollout.envpool_backend import EnvPoolVectorEnv
from labfleet.rollout.envs import EnvMaker
from labfleet.rollout.sampler import VectorSampler, evaluate_policy
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


def _cartpole(u, obs):
    u.state = obs.astype(np.float64)


def _pendulum(u, obs):
    u.state = np.array([np.arctan2(obs[1], obs[0]), obs[2]])


def _mujoco(u, obs):  # the observation leaves out x, which nothing but the reward's x velocity depends on
    nq = u.model.nq
    u.set_state(np.concatenate([[0.0], obs[:nq - 1]]), obs[nq - 1:])


# (task, state setter, steps compared, tolerance on observations): whole episodes, except HalfCheetah, which
# never ends early and whose contacts amplify rounding after about 90 steps.
PARITY = [("CartPole-v1", _cartpole, 500, 1e-6), ("Pendulum-v1", _pendulum, 200, 1e-4),
          ("Hopper-v5", _mujoco, 1000, 1e-9), ("HalfCheetah-v5", _mujoco, 50, 1e-8),
          ("InvertedPendulum-v5", lambda u, obs: u.set_state(obs[:2], obs[2:]), 1000, 1e-9)]


@pytest.mark.parametrize(("task", "set_state", "steps", "tol"), PARITY, ids=[p[0] for p in PARITY])
def test_envpool_steps_as_gymnasium_does_from_the_same_state(task, set_state, steps, tol):
    pool = EnvPoolVectorEnv(task, 1)
    obs, _ = pool.reset(seed=[3])
    env = gym.make(task)
    env.reset(seed=0)
    set_state(env.unwrapped, obs[0])
    assert pool.single_observation_space.shape == env.observation_space.shape
    assert pool.single_action_space == env.action_space
    rng = np.random.default_rng(5)
    for t in range(steps):
        if isinstance(env.action_space, gym.spaces.Discrete):
            action = int(rng.integers(env.action_space.n))
        else:
            action = rng.uniform(env.action_space.low, env.action_space.high).astype(env.action_space.dtype)
        expected, reward, terminated, truncated, _ = env.step(action)
        got, rewards, terms, truncs, info = pool.step(np.asarray([action]))
        ended = bool(terms[0] or truncs[0])
        np.testing.assert_allclose(info["final_obs"][0] if ended else got[0], expected, rtol=0, atol=tol,
                                   err_msg=f"{task}, step {t}")
        assert rewards[0] == pytest.approx(reward, rel=1e-5, abs=1e-5), (task, t)
        assert (bool(terms[0]), bool(truncs[0])) == (terminated, truncated), (task, t)
        if terminated or truncated:
            break
    pool.close()
    env.close()


def test_an_ended_episode_is_reset_in_the_same_step_and_the_next_action_counts():
    pool = EnvPoolVectorEnv("CartPole-v1", 2)
    obs, _ = pool.reset(seed=[1, 2])
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    for _ in range(200):  # pushing right topples the pole within a few dozen steps
        obs, _, term, trunc, info = pool.step(np.array([1, 0]))
        if term[0]:
            break
    assert term[0] and not trunc[0]
    final = info["final_obs"][0]
    assert abs(final[2]) > 0.2094 or abs(final[0]) > 2.4, "the final observation is the terminal state"
    assert np.all(np.abs(obs[0]) <= 0.05), "obs is already the next episode's first observation"
    # the next step steps that first observation with its action (EnvPool alone would reset here instead)
    env.unwrapped.state = obs[0].astype(np.float64)
    expected, *_ = env.step(1)
    got, *_ = pool.step(np.array([1, 0]))
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_each_environment_has_its_own_seed():
    """Environment i of a trial is the same however the trial's environments are split (rollout workers)."""
    maker = EnvMaker("CartPole-v1", backend="envpool")
    torch.manual_seed(0)
    policy = NumpyPolicy(make_policy(*maker.spaces(), [16], "tanh"), torch.device("cpu"))
    whole = VectorSampler(maker, 4, seed=7).collect(policy, 300)
    upper = VectorSampler(maker, 2, seed=7, first_env=2).collect(policy, 300)
    for name in ("obs", "actions", "rewards", "terminated", "next_obs"):
        np.testing.assert_allclose(getattr(whole, name)[:, 2:], getattr(upper, name), rtol=1e-6, err_msg=name)
    assert whole.episode_returns and not np.array_equal(whole.obs[:, 0], whole.obs[:, 1])
    # evaluation episodes are seeded alike: the same returns twice, other returns for another seed
    def act(obs):
        return policy(obs, policy.transform_noise(np.full((len(obs), policy.noise_dim), 0.5)))

    first, again = evaluate_policy(maker, act, 6, seed=3), evaluate_policy(maker, act, 6, seed=3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, evaluate_policy(maker, act, 6, seed=4))


def _problems(overrides: dict, spec: str = "cartpole_ppo.yaml") -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(EXPERIMENTS / spec, {"env_backend": "envpool", **overrides})
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_specs_that_cannot_run_on_envpool_are_refused():
    assert load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {"env_backend": "envpool"}).env_backend == "envpool"
    [unknown] = _problems({"env": "CartPol-v1"})
    assert unknown.startswith("env: EnvPool has no environment 'CartPol-v1' (did you mean: CartPole-v1")
    [option] = _problems({"env_kwargs": {"max_episode_stepz": 10}})
    assert option.startswith("env_kwargs: EnvPool cannot make CartPole-v1") and "max_episode_stepz" in option
    [wrappers] = _problems({"env_wrappers": [{"type": "TimeLimit", "kwargs": {"max_episode_steps": 30}}]})
    assert wrappers.startswith("env_wrappers: EnvPool's environments take no gymnasium wrappers")
    [path] = _problems({"env": "os:system"})
    assert path.startswith("env: EnvPool steps its own environments")
    model = _problems({}, "frozenlake_value_iteration.yaml")[0]
    assert model.startswith("env_backend: value_iteration reads gymnasium's transition model")
    [spaces] = _problems({"env": "Pendulum-v1"}, "cartpole_dqn.yaml")
    assert spaces.startswith("algorithm: dqn needs a discrete action space")
    [dataset] = _problems({}, "ring_gan.yaml")
    assert dataset.startswith("env_backend: gan has no environment to step")


def test_enjoy_plays_episodes_on_envpool_and_refuses_video(tmp_path):
    from labfleet.algorithms import registry
    from labfleet.playback import play

    spec = load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {"env_backend": "envpool"})
    trainer = registry.get("ppo").trainer(spec, 0, "cpu")
    returns = play(trainer, 2, None)
    assert len(returns) == 2 and all(r >= 1 for r in returns)
    assert play(trainer, 2, None) == returns, "episode k is seeded alike each time"
    with pytest.raises(ValueError, match="rendered through gymnasium"):
        play(trainer, 1, tmp_path)


@pytest.mark.slow
def test_atari_on_envpool_feeds_the_cnn_and_evaluates_the_whole_game():
    from labfleet.algorithms import registry
    from labfleet.algorithms.rl.networks import NatureCNN

    options = {"episodic_life": True, "reward_clip": True, "max_episode_steps": 1000}
    evaluation = EnvPoolVectorEnv("Breakout-v5", 1, options, evaluation=True).options
    assert evaluation["episodic_life"] is False and evaluation["reward_clip"] is False
    assert evaluation["max_episode_steps"] == 1000
    spec = load_spec(EXPERIMENTS / "atari" / "breakout_ppo.yaml", {
        "env": "Breakout-v5", "env_backend": "envpool", "env_kwargs": options, "env_wrappers": [],
        "hparams.n_envs": 2, "hparams.n_steps": 128, "hparams.batch_size": 128, "hparams.n_epochs": 1,
        "budget.env_steps": 256, "eval.episodes": 1})
    trainer = registry.get("ppo").trainer(spec, 0, "cpu")
    assert trainer.observation_space.shape == (4, 84, 84) and trainer.observation_space.dtype == np.uint8
    assert sum(isinstance(m, NatureCNN) for m in trainer.ac.modules()) == 1
    before = [p.detach().clone() for p in trainer.ac.parameters()]
    logged = trainer.train_iteration()
    assert trainer.done and logged["time/env_steps"] == 256
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.ac.parameters(), strict=True))
    assert trainer.evaluate()["eval/return_mean"] >= 0


def test_without_envpool_the_backend_is_refused_with_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "envpool", None)  # import envpool raises ImportError
    [problem] = _problems({})
    assert problem.startswith("env_backend: EnvPool is not installed: pip install 'labfleet[envpool]'")
