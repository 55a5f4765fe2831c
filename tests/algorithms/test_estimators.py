"""Return estimators against hand computations (termination vs truncation vs rollout cut)."""

from __future__ import annotations

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
