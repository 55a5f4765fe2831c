"""A uniform replay buffer for off-policy learners, kept in the trial process (actors only collect).

Transitions are stored as (s, a, r, s', terminated): s' is the true next observation (the final one where
an episode ended), so a transition cut by a time limit is bootstrapped and a terminal one is not.
Sampling uses the buffer's own seeded generator; the whole buffer is part of the trainer's checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from labfleet.algorithms.base import rng_state, set_rng_state
from labfleet.rollout.sampler import Rollout


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, action_shape: tuple[int, ...],
                 action_dtype: Any, seed: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.position = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def add_rollout(self, rollout: Rollout) -> None:
        """Append a (T, N) rollout in time-major, then environment, order."""
        T, N = rollout.rewards.shape
        flat = {
            "obs": rollout.obs.reshape(T * N, *rollout.obs.shape[2:]),
            "next_obs": rollout.next_obs.reshape(T * N, *rollout.next_obs.shape[2:]),
            "actions": rollout.actions.reshape(T * N, *rollout.actions.shape[2:]),
            "rewards": rollout.rewards.reshape(T * N),
            "terminated": rollout.terminated.reshape(T * N),
        }
        for k in range(T * N):  # ring buffer: wrap transition by transition
            i = self.position
            for name, values in flat.items():
                getattr(self, name)[i] = values[k]
            self.position = (self.position + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, self.size, size=batch_size)
        return {name: torch.as_tensor(getattr(self, name)[idx], device=device)
                for name in ("obs", "actions", "rewards", "next_obs", "terminated")}

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"obs": torch.from_numpy(self.obs[:n].copy()), "next_obs": torch.from_numpy(self.next_obs[:n].copy()),
                "actions": torch.from_numpy(self.actions[:n].copy()),
                "rewards": torch.from_numpy(self.rewards[:n].copy()),
                "terminated": torch.from_numpy(self.terminated[:n].copy()),
                "position": self.position, "size": self.size, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
            getattr(self, name)[:n] = state[name].numpy()
        self.position, self.size = int(state["position"]), n
        set_rng_state(self.rng, state["rng"])
