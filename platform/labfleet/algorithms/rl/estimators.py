"""Return and advantage estimators: pure functions of time-major (T, N) tensors.

Conventions for every function here: `terminated[t]` means the episode ended in a terminal state at step
t (no value beyond it); `truncated[t]` means it was cut by a time limit (the value of the true next state
`next_values[t] = V(s_{t+1})` stands in for the rest); the last step of a rollout is cut too, and is
bootstrapped from `next_values[T-1]` unless it terminated.
"""

from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                       next_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1} within an episode, with
    G_t = r_t                            where the episode terminates at t,
    G_t = r_t + gamma * V(s_{t+1})       where it is truncated at t, or at the rollout's last step."""
    T = rewards.shape[0]
    returns = torch.empty_like(rewards)
    future = next_values[T - 1]  # (N,)
    for t in reversed(range(T)):
        cut = truncated[t] | (t == T - 1)
        future = torch.where(cut, next_values[t], future)
        future = torch.where(terminated[t], torch.zeros_like(future), future)
        returns[t] = rewards[t] + gamma * future
        future = returns[t]
    return returns
