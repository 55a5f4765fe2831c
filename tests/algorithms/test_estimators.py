"""Return estimators against hand computations (termination vs truncation vs rollout cut)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet.algorithms.rl.estimators import discounted_returns
from labfleet.algorithms.rl.reinforce import reinforce_policy_loss, value_loss


def _col(*values):
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)  # (T, 1)


def _flags(*values):
    return torch.tensor(values, dtype=torch.bool).unsqueeze(1)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_terminal_episode_is_not_bootstrapped(gamma):
    rewards = _col(1, 2, 3)
    returns = discounted_returns(rewards, _flags(0, 0, 1), _flags(0, 0, 0), _col(10, 10, 10), gamma)
    expected = [1 + gamma * 2 + gamma ** 2 * 3, 2 + gamma * 3, 3]
    assert returns.squeeze(1).tolist() == pytest.approx(expected)


def test_truncated_episode_bootstraps_from_its_final_state():
    # step 1 is cut by a time limit: V(final obs) = 5 stands in; a new episode starts at step 2
    returns = discounted_returns(_col(1, 1, 1), _flags(0, 0, 0), _flags(0, 1, 0), _col(7, 5, 4), 0.5)
    assert returns.squeeze(1).tolist() == pytest.approx([1 + 0.5 * (1 + 0.5 * 5), 1 + 0.5 * 5, 1 + 0.5 * 4])


def test_rollout_cut_bootstraps_from_next_value():
    returns = discounted_returns(_col(0, 0), _flags(0, 0), _flags(0, 0), _col(99, 8), 0.9)
    assert returns.squeeze(1).tolist() == pytest.approx([0.81 * 8, 0.9 * 8])


def test_environments_are_independent():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    terminated = torch.tensor([[True, False], [False, False]])
    truncated = torch.zeros(2, 2, dtype=torch.bool)
    next_values = torch.tensor([[3.0, 3.0], [2.0, 6.0]])
    returns = discounted_returns(rewards, terminated, truncated, next_values, 0.5)
    assert returns.flatten().tolist() == pytest.approx([1.0, 0.5 * (1 + 0.5 * 6), 1 + 0.5 * 2, 1 + 0.5 * 6])


def test_reinforce_losses():
    logp = torch.tensor([-0.5, -1.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss = reinforce_policy_loss(logp, adv)
    assert loss.item() == pytest.approx(-((-0.5 * 2.0) + (-1.0 * -1.0)) / 2)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 0.5])  # -A / batch
    assert float(value_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(2.5)


# --- GAE, TD targets, PPO losses, Polyak, epsilon, tabular updates ------------------------------------

from labfleet.algorithms.rl.estimators import gae_advantages, polyak_update, td_target  # noqa: E402
from labfleet.algorithms.rl.exploration import EpsilonGreedyTable, greedy_with_ties, linear_epsilon  # noqa: E402
from labfleet.algorithms.rl.ppo import clipped_surrogate_loss, clipped_value_loss, explained_variance  # noqa: E402
from labfleet.algorithms.rl.qlearning import q_learning_update  # noqa: E402
from labfleet.algorithms.rl.sarsa import sarsa_update  # noqa: E402
from labfleet.algorithms.rl.value_iteration import bellman_optimality_backup, transition_tensors  # noqa: E402


def _gae_by_hand(r, v, v_next, term, trunc, gamma, lam):
    T = len(r)
    adv = [0.0] * T
    running = 0.0
    for t in reversed(range(T)):
        delta = r[t] + gamma * v_next[t] * (0.0 if term[t] else 1.0) - v[t]
        running = delta + gamma * lam * (0.0 if (term[t] or trunc[t]) else 1.0) * running
        adv[t] = running
    return adv


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_gae_against_hand_computation(gamma, lam):
    r, v = [1.0, 0.5, -1.0, 2.0], [0.2, 0.4, 0.6, 0.8]
    v_next = [0.4, 9.0, 0.8, 1.5]  # step 1 ends in a terminal state: its V(s') must not count
    term, trunc = [False, True, False, False], [False, False, False, False]
    adv = gae_advantages(_col(*r), _col(*v), _flags(*term), _flags(*trunc), _col(*v_next), gamma, lam)
    assert adv.squeeze(1).tolist() == pytest.approx(_gae_by_hand(r, v, v_next, term, trunc, gamma, lam))


def test_gae_exact_numbers():
    # gamma 0.9, lambda 0.9; T = 2, no episode end: delta_1 = 1 + 0.9*2 - 1 = 1.8, delta_0 = 0 + 0.9*1 - 0.5 = 0.4
    adv = gae_advantages(_col(0, 1), _col(0.5, 1), _flags(0, 0), _flags(0, 0), _col(1, 2), 0.9, 0.9)
    assert adv.squeeze(1).tolist() == pytest.approx([0.4 + 0.81 * 1.8, 1.8])


def test_gae_truncation_bootstraps_but_does_not_carry_over():
    # truncated at step 0: delta_0 = 1 + 0.5 * V(final) - 0 = 1 + 0.5 * 4; the next episode's advantage is cut off
    adv = gae_advantages(_col(1, 1), _col(0, 0), _flags(0, 0), _flags(1, 0), _col(4, 2), 0.5, 1.0)
    assert adv.squeeze(1).tolist() == pytest.approx([3.0, 2.0])


def test_gae_with_lambda_one_is_returns_minus_values():
    r, v, nv = _col(1, 2, 3), _col(0.1, 0.2, 0.3), _col(0.2, 0.3, 5.0)
    term, trunc = _flags(0, 0, 0), _flags(0, 0, 0)
    adv = gae_advantages(r, v, term, trunc, nv, 0.9, 1.0)
    torch.testing.assert_close(adv, discounted_returns(r, term, trunc, nv, 0.9) - v)


def test_td_target_terminal_vs_truncated():
    rewards, next_q = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    terminated = torch.tensor([True, False])  # the second transition was truncated: it bootstraps
    assert td_target(rewards, next_q, terminated, 0.9).tolist() == pytest.approx([1.0, 10.0])


def test_munchausen_target_against_hand_computation():
    from labfleet.algorithms.rl.dqn import munchausen_targets

    tau, alpha, gamma = 0.5, 0.9, 0.9
    q_obs = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    q_next = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    actions, rewards = torch.tensor([0, 1, 1]), torch.tensor([1.0, 0.0, 1.0])
    terminated = torch.tensor([False, False, True])
    y = munchausen_targets(q_obs, q_next, actions, rewards, terminated, gamma, alpha, tau, -1.0)
    # tau ln pi(a|s) with pi = softmax(q / tau): row 0, action 0: 1 - 0.5 ln(e^2 + e^4) = -1 - 0.5 ln(1 + e^-2)
    # = -1.0635, clipped to -1; row 1: 0.5 ln(1/2) = -0.3466; row 2: action 1 is 3 below: clipped to -1.
    # Soft value tau * logsumexp(q' / tau): row 0: 0.5 ln(e^2 + 1) = 1.0635; row 1: 2 + 0.5 ln 2 = 2.3466.
    expected = [1 - 0.9 + 0.9 * 0.5 * np.log(np.e ** 2 + 1),
                0 + 0.9 * 0.5 * np.log(0.5) + 0.9 * (2 + 0.5 * np.log(2)),
                1 - 0.9]  # terminal: no bootstrap
    assert y.tolist() == pytest.approx(expected, abs=1e-6)
    # alpha 0 leaves soft Q-learning's target: r + gamma * tau * logsumexp(q' / tau)
    y0 = munchausen_targets(q_obs, q_next, actions, rewards, terminated, gamma, 0.0, tau, -1.0)
    assert y0.tolist() == pytest.approx([1 + 0.9 * 1.0635, 0.9 * 2.3466, 1.0], abs=1e-4)


def test_munchausen_and_double_q_are_refused_together():
    from labfleet.algorithms.rl.dqn import DQNHParams

    with pytest.raises(ValueError, match="munchausen and double_q"):
        DQNHParams(munchausen=0.9, double_q=True)
    assert DQNHParams(munchausen=0.9).munchausen == 0.9
    with pytest.raises(ValueError, match="munchausen's target is a one-step target"):
        DQNHParams(munchausen=0.9, n_step=3)


@pytest.mark.parametrize(("ratio", "adv", "expected"), [
    (1.5, 1.0, -1.2),   # clipped at 1 + eps: min(1.5, 1.2) * 1
    (0.5, 1.0, -0.5),   # below 1 - eps with A > 0: the unclipped term is smaller
    (0.5, -1.0, 0.8),   # A < 0: min(-0.5, -0.8) = -0.8, loss 0.8
    (1.5, -1.0, 1.5),   # A < 0, ratio above: min(-1.5, -1.2) = -1.5
    (1.1, 2.0, -2.2),   # inside the clip range
])
def test_clipped_surrogate_at_known_ratios(ratio, adv, expected):
    loss = clipped_surrogate_loss(torch.tensor([ratio]), torch.tensor([adv]), 0.2)
    assert loss.item() == pytest.approx(expected)


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    ratio = torch.tensor([1.5], requires_grad=True)
    clipped_surrogate_loss(ratio, torch.tensor([1.0]), 0.2).backward()
    assert ratio.grad.item() == 0.0


def test_value_clipping():
    v, v_old, ret = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0])
    assert clipped_value_loss(v, v_old, ret, None).item() == pytest.approx(1.0)
    # clipped prediction 1.2: max((2-3)^2, (1.2-3)^2) = 3.24
    assert clipped_value_loss(v, v_old, ret, 0.2).item() == pytest.approx(3.24)


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), target) == pytest.approx(0.0)


def test_polyak_update():
    source, target = [torch.tensor([1.0, 3.0])], [torch.tensor([0.0, 1.0])]
    polyak_update(source, target, 0.25)
    assert target[0].tolist() == pytest.approx([0.25, 1.5])
    polyak_update(source, target, 1.0)
    assert target[0].tolist() == pytest.approx([1.0, 3.0])


@pytest.mark.parametrize(("progress", "expected"), [(0.0, 1.0), (0.05, 0.525), (0.1, 0.05), (0.7, 0.05)])
def test_linear_epsilon_schedule(progress, expected):
    assert linear_epsilon(progress, 1.0, 0.05, 0.1) == pytest.approx(expected)


def test_epsilon_greedy_table():
    q = np.array([[0.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    greedy = EpsilonGreedyTable(q, epsilon=0.0)
    actions = greedy(np.array([0, 0, 1]), np.array([[0.9, 0.1], [0.9, 0.9], [0.5, 0.5]]))
    assert actions.tolist() == [1, 2, 0]  # ties between actions 1 and 2 broken by the second uniform
    explore = EpsilonGreedyTable(q, epsilon=1.0)
    assert explore(np.array([1, 1]), np.array([[0.0, 0.0], [0.5, 0.99]])).tolist() == [0, 2]
    probs = EpsilonGreedyTable(q, epsilon=0.3).probabilities(np.array([0, 1]))
    assert probs.flatten().tolist() == pytest.approx([0.1, 0.45, 0.45, 0.8, 0.1, 0.1])
    assert greedy_with_ties(np.array([[2.0, 2.0, 2.0]]), np.array([0.5])).tolist() == [1]


def test_q_learning_update():
    q = np.array([[0.0, 0.0], [1.0, 3.0]])
    error = q_learning_update(q, 0, 1, r=1.0, s_next=1, terminated=False, alpha=0.5, gamma=0.9)
    assert error == pytest.approx(1 + 0.9 * 3)  # max over the next state's actions
    assert q[0, 1] == pytest.approx(0.5 * 3.7)
    q_learning_update(q, 0, 0, r=1.0, s_next=1, terminated=True, alpha=0.5, gamma=0.9)
    assert q[0, 0] == pytest.approx(0.5)


def test_sarsa_update_uses_the_next_action_taken():
    q = np.array([[0.0, 0.0], [1.0, 3.0]])
    sarsa_update(q, 0, 1, r=1.0, next_value=q[1, 0], terminated=False, alpha=0.5, gamma=0.9)
    assert q[0, 1] == pytest.approx(0.5 * (1 + 0.9 * 1.0))  # Q(s', a'=0), not the max


def test_value_iteration_on_a_two_state_chain():
    # state 0: action 0 stays (reward 0), action 1 moves to terminal state 1 with reward 1 (prob 0.5) else stays
    P = {0: {0: [(1.0, 0, 0.0, False)], 1: [(0.5, 1, 1.0, True), (0.5, 0, 0.0, False)]},
         1: {0: [(1.0, 1, 0.0, True)], 1: [(1.0, 1, 0.0, True)]}}
    cont, reward = transition_tensors(P, 2, 2)
    assert reward.tolist() == [[0.0, 0.5], [0.0, 0.0]]
    v = np.zeros(2)
    for _ in range(200):
        v = bellman_optimality_backup(v, cont, reward, 0.9).max(axis=1)
    # V(0) = 0.5 + 0.9 * 0.5 * V(0)  =>  V(0) = 0.5 / 0.55
    assert v[0] == pytest.approx(0.5 / 0.55) and v[1] == 0.0


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_closed_form_log_prob_and_entropy_match_torch_distributions(kind):
    import gymnasium as gym

    from labfleet.algorithms.rl.networks import make_policy

    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-1, 1, (3,))
    act_space = gym.spaces.Discrete(4) if kind == "categorical" else gym.spaces.Box(-1, 1, (2,))
    policy = make_policy(obs_space, act_space, [8], "tanh")
    if kind == "gaussian":
        policy.log_std.data = torch.tensor([0.3, -0.7])
    obs = torch.randn(5, 3)
    dist = policy.distribution(obs)
    actions = dist.sample()
    logp, entropy = policy.log_prob_entropy(obs, actions)
    torch.testing.assert_close(logp, dist.log_prob(actions))
    torch.testing.assert_close(entropy, dist.entropy())
