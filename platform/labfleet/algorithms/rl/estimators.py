"""Return and advantage estimators: pure functions of time-major (T, N) tensors.

Conventions for every function here: `terminated[t]` means the episode ended in a terminal state at step
t (no value beyond it); `truncated[t]` means it was cut by a time limit (the value of the true next state
`next_values[t] = V(s_{t+1})` stands in for the rest); the last step of a rollout is cut too, and is
bootstrapped from `next_values[T-1]` unless it terminated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def discounted_returns(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                       next_values: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
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


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                   next_values: torch.Tensor, gamma: float | torch.Tensor, gae_lambda: float | torch.Tensor
                   ) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16):
        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lambda * A_{t+1}, the sum restarting wherever an episode ended at t.
    `values[t] = V(s_t)`; `next_values[t] = V(s_{t+1})` for the true next state (the final observation
    where an episode ended), so truncated episodes and the rollout's end are bootstrapped. `gamma` and
    `gae_lambda` may be tensors that broadcast against one step's (N, ...) (each seed its own, batched.py)."""
    T = rewards.shape[0]
    advantages = torch.empty_like(rewards)
    not_terminal = (~terminated).float()
    ended = (terminated | truncated).float()
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] * not_terminal[t] - values[t]
        running = delta + gamma * gae_lambda * (1.0 - ended[t]) * running
        advantages[t] = running
    return advantages


def td_target(rewards: torch.Tensor, next_q: torch.Tensor, terminated: torch.Tensor,
              gamma: float | torch.Tensor) -> torch.Tensor:
    """One-step TD target r + gamma * max_a' Q(s', a') (or the caller's choice of next value), with no
    bootstrap past a terminal state. A truncated transition is bootstrapped: time limits are not
    terminal states. `gamma` may be a tensor of per-sample discounts (gamma^k of k-step transitions)."""
    return rewards + gamma * next_q * (~terminated).float()


@torch.no_grad()
def polyak_update(params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor], tau: float) -> None:
    """theta_targ <- tau * theta + (1 - tau) * theta_targ (tau = 1: a hard copy), as one lerp over all."""
    sources, targets = list(params), list(target_params)
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} parameters but {len(targets)} target parameters")
    torch._foreach_lerp_(targets, sources, tau)
