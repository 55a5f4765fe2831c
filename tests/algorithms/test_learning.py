"""Every RL algorithm learns a small task to a threshold (STYLE 6: the reward-threshold level).

Budgets are cut to fit CI; the thresholds sit well above a random policy and below what was measured
(noted per test). The shipped specs' own quality bars are measured by benchmarks/, not here.
"""

from __future__ import annotations

import numpy as np
import pytest

from labfleet.algorithms import registry
from labfleet.rollout.envs import make_env
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


def train(spec_file: str, overrides: dict, seed: int):
    spec = load_spec(EXPERIMENTS / spec_file, overrides)
    trainer = registry.get(spec.algorithm).trainer(spec, seed, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    return trainer


@pytest.mark.slow
def test_ppo_solves_cartpole_at_its_shipped_budget():
    # The shipped spec (100k steps); measured 500 on seeds 0, 1, 2.
    trainer = train("cartpole_ppo.yaml", {}, 0)
    assert trainer.evaluate()["eval/return_mean"] >= 450


@pytest.mark.slow
def test_a2c_learns_cartpole():
    # 100k of the shipped 500k steps; random: about 22. Truncated RL runs round differently per CPU: seeds
    # 0, 1 gave 91 and 387 on one machine and 73.9, 186.05 (seed 2: 500) on an AVX-512 one, so three seeds.
    returns = [train("cartpole_a2c.yaml", {"budget.env_steps": 100_000}, s).evaluate()["eval/return_mean"]
               for s in (0, 1, 2)]
    assert np.mean(returns) >= 120 and max(returns) >= 200, returns


@pytest.mark.slow
def test_dqn_learns_cartpole():
    # 30k of the shipped 50k steps, one seed (the shipped budget's bar is the benchmark's: quality_bars.py).
    # Measured at 30k on seeds 0-5 with the spec's 3-step targets: 499.1, 445.3, 500, 263.4, 447.0, 492.3
    # (with one-step targets: 229, 191, 192, 163, 158, 456); random: about 22.
    # The network training ends with, as measured there: no selection among evaluations (there are none here).
    ret = train("cartpole_dqn.yaml", {"budget.env_steps": 30_000, "eval.episodes": 10, "eval.select_best": False},
                0).evaluate()
    assert ret["eval/return_mean"] >= 200, ret


@pytest.mark.slow
def test_ddpg_learns_pendulum():
    # Small networks and 6k steps; measured -99 (seed 0); random: about -1200.
    trainer = train("pendulum_ddpg.yaml", {"budget.env_steps": 6000, "hparams.learning_starts": 1000,
                                           "hparams.net_arch": [64, 64], "eval.episodes": 5}, 0)
    assert trainer.evaluate()["eval/return_mean"] >= -400


def policy_value(env_id: str, env_kwargs: dict, policy: np.ndarray, gamma: float) -> np.ndarray:
    """Exact V^pi of a deterministic policy from the environment's model: solve (I - gamma P_pi) V = R_pi."""
    from labfleet.algorithms.rl.value_iteration import transition_tensors

    env = make_env(env_id, env_kwargs)
    n_states, n_actions = env.observation_space.n, env.action_space.n
    cont, reward = transition_tensors(env.unwrapped.P, n_states, n_actions)
    states = np.arange(n_states)
    return np.linalg.solve(np.eye(n_states) - gamma * cont[states, policy], reward[states, policy])


def test_value_iteration_is_optimal_on_frozenlake():
    trainer = train("frozenlake_value_iteration.yaml", {"eval.episodes": 1000}, 0)
    assert trainer.done and trainer.residual < 1e-10
    v_star = policy_value("FrozenLake-v1", trainer.spec.env_kwargs, trainer.q.argmax(axis=1), 0.99)
    np.testing.assert_allclose(v_star, trainer.v, atol=1e-8)  # its greedy policy attains V*
    assert trainer.evaluate()["eval/return_mean"] >= 0.70  # measured 0.746 over 1000 episodes


@pytest.mark.slow
@pytest.mark.parametrize("spec_file", ["frozenlake_qlearning.yaml", "frozenlake_sarsa.yaml"])
def test_tabular_learners_approach_value_iteration(spec_file):
    reference = train("frozenlake_value_iteration.yaml", {}, 0)
    learner = train(spec_file, {"budget.env_steps": 200_000}, 0)
    env_kwargs = learner.spec.env_kwargs
    v_learned = policy_value("FrozenLake-v1", env_kwargs, learner.q.argmax(axis=1), 0.99)
    # The start state's value is the greedy policy's discounted success; measured within 0.01 of V*(0).
    assert v_learned[0] >= reference.v[0] - 0.05, (v_learned[0], reference.v[0])
