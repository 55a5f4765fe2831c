"""Exploration plumbing shared by value-based learners: the epsilon schedule and epsilon-greedy tables."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field


class EpsilonGreedyHParams(BaseModel):
    """Stable-Baselines3's exploration fields: epsilon decays linearly from `exploration_initial_eps` to
    `exploration_final_eps` over the first `exploration_fraction` of the budget, then stays."""

    exploration_initial_eps: float = Field(1.0, ge=0, le=1, description="Epsilon at the start.")
    exploration_final_eps: float = Field(0.05, ge=0, le=1, description="Epsilon after the decay.")
    exploration_fraction: float = Field(0.1, gt=0, le=1, description="Share of the budget spent decaying.")

    def epsilon_at(self, progress: float) -> float:
        return linear_epsilon(progress, self.exploration_initial_eps, self.exploration_final_eps,
                              self.exploration_fraction)


def linear_epsilon(progress: float, initial: float, final: float, fraction: float) -> float:
    """initial -> final linearly over progress in [0, fraction], then final."""
    return initial + (final - initial) * min(max(progress, 0.0) / fraction, 1.0)


def greedy_with_ties(q_rows: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """argmax per row, ties broken uniformly at random by `uniforms` (N,) in (0, 1)."""
    best = q_rows == q_rows.max(axis=1, keepdims=True)  # (N, A)
    counts = best.sum(axis=1)
    pick = np.minimum((uniforms * counts).astype(np.int64), counts - 1)  # which of the tied actions
    return np.argmax(np.cumsum(best, axis=1) > pick[:, None], axis=1)


class EpsilonGreedyTable:
    """Acts on a Q table: with probability epsilon a uniform random action, else greedy (random ties).
    Noise per environment: u0 decides whether to explore, u1 picks the action."""

    noise_dim = 2

    @staticmethod
    def transform_noise(uniforms: np.ndarray) -> np.ndarray:
        return uniforms

    def __init__(self, q: np.ndarray, epsilon: float):
        self.q = q  # (S, A), shared with the learner: updates are seen at once
        self.epsilon = epsilon

    def __call__(self, obs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        n_actions = self.q.shape[1]
        explore = uniforms[:, 0] < self.epsilon
        random_actions = np.minimum((uniforms[:, 1] * n_actions).astype(np.int64), n_actions - 1)
        return np.where(explore, random_actions, greedy_with_ties(self.q[obs], uniforms[:, 1]))

    # the rollout-worker protocol
    def get_state(self) -> dict[str, Any]:
        return {"q": self.q.copy(), "epsilon": self.epsilon}

    def set_state(self, state: dict[str, Any]) -> None:
        self.q[...] = state["q"]
        self.epsilon = state["epsilon"]

    def to_cpu(self) -> None:
        pass

    def probabilities(self, states: np.ndarray) -> np.ndarray:
        """pi(a|s) for each state: (N, A). Greedy mass is shared among tied actions."""
        rows = self.q[states]
        best = rows == rows.max(axis=1, keepdims=True)
        n_actions = rows.shape[1]
        return self.epsilon / n_actions + (1 - self.epsilon) * best / best.sum(axis=1, keepdims=True)


class EpsilonGreedyNet:
    """Acts on a Q network: with probability epsilon a uniform random action, else argmax_a Q(s, a)."""

    noise_dim = 2

    @staticmethod
    def transform_noise(uniforms: np.ndarray) -> np.ndarray:
        return uniforms

    def __init__(self, q_net: Any, n_actions: int, device: Any, epsilon: float = 1.0):
        self.q_net = q_net
        self.n_actions = n_actions
        self.device = device
        self.epsilon = epsilon

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.q_net(torch.as_tensor(obs, device=self.device)).argmax(dim=-1).cpu().numpy()

    # the rollout-worker protocol
    def get_state(self) -> dict[str, Any]:
        return {"q": {k: v.detach().cpu() for k, v in self.q_net.state_dict().items()}, "epsilon": self.epsilon}

    def set_state(self, state: dict[str, Any]) -> None:
        self.q_net.load_state_dict(state["q"])
        self.epsilon = state["epsilon"]

    def to_cpu(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self.q_net.to(self.device)

    def __call__(self, obs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        explore = uniforms[:, 0] < self.epsilon
        random_actions = np.minimum((uniforms[:, 1] * self.n_actions).astype(np.int64), self.n_actions - 1)
        if explore.all():
            return random_actions
        return np.where(explore, random_actions, self.greedy(obs))
