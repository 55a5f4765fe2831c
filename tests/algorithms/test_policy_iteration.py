"""Policy iteration: exact evaluation against a hand computation, and its policy is value iteration's
optimum on FrozenLake and Taxi (the same V*, and a greedy policy that attains it)."""

from __future__ import annotations

import numpy as np
import pytest

from labfleet.algorithms import registry
from labfleet.algorithms.rl.policy_iteration import policy_evaluation, policy_improvement
from labfleet.algorithms.rl.value_iteration import bellman_optimality_backup, transition_tensors
from labfleet.rollout.envs import make_env
from labfleet.spec.loading import resolve_spec_data


def test_policy_evaluation_on_a_two_state_chain():
    # State 0 --a0--> 0 (reward 1), --a1--> 1 (reward 0); state 1 --any--> terminal with reward 2.
    cont = np.zeros((2, 2, 2))
    cont[0, 0, 0] = 1.0
    cont[0, 1, 1] = 1.0
    reward = np.array([[1.0, 0.0], [2.0, 2.0]])
    gamma = 0.9
    stay = policy_evaluation(np.array([0, 0]), cont, reward, gamma)
    np.testing.assert_allclose(stay, [1 / (1 - gamma), 2.0])  # 10: a geometric series of ones
    move = policy_evaluation(np.array([1, 0]), cont, reward, gamma)
    np.testing.assert_allclose(move, [gamma * 2.0, 2.0])
    q = bellman_optimality_backup(move, cont, reward, gamma)
    np.testing.assert_array_equal(policy_improvement(np.array([1, 0]), q, 1e-12), [0, 0])  # staying is better


def test_improvement_keeps_the_current_action_among_ties():
    q = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    np.testing.assert_array_equal(policy_improvement(np.array([1, 2]), q, 1e-12), [1, 2])
    np.testing.assert_array_equal(policy_improvement(np.array([2, 0]), q, 1e-12), [0, 1])


def _train(algorithm: str, env: str, env_kwargs: dict, budget: int):
    spec = resolve_spec_data({"name": "t", "algorithm": algorithm, "env": env, "env_kwargs": env_kwargs,
                              "budget": {"iterations": budget}, "hparams": {"gamma": 0.99},
                              "eval": {"episodes": 200}}, "test")
    trainer = registry.get(algorithm).trainer(spec, 0, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    return trainer


@pytest.mark.parametrize(("env", "env_kwargs"), [("FrozenLake-v1", {"map_name": "4x4", "is_slippery": True}),
                                                 ("FrozenLake-v1", {"map_name": "8x8", "is_slippery": True}),
                                                 ("Taxi-v4", {})])
def test_policy_iteration_reaches_value_iterations_optimum(env, env_kwargs):
    pi = _train("policy_iteration", env, env_kwargs, 100)
    vi = _train("value_iteration", env, env_kwargs, 5000)
    assert pi.stable and pi.iterations < 100, "policy iteration must stop on a stable policy"
    np.testing.assert_allclose(pi.v, vi.v, atol=1e-6)  # the same V*
    made = make_env(env, env_kwargs)
    cont, reward = transition_tensors(made.unwrapped.P, made.observation_space.n, made.action_space.n)
    # Its policy attains V*, and it is greedy in V*: wherever value iteration's optimal action is unique
    # by a clear margin, both pick it.
    np.testing.assert_allclose(policy_evaluation(pi.policy, cont, reward, 0.99), vi.v, atol=1e-6)
    q = bellman_optimality_backup(vi.v, cont, reward, 0.99)
    top2 = np.sort(q, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-6
    np.testing.assert_array_equal(pi.policy[clear], q.argmax(axis=1)[clear])
    assert pi.evaluate()["eval/return_mean"] == vi.evaluate()["eval/return_mean"]  # same episodes, same policy
