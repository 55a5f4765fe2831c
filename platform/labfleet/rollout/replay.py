"""A uniform replay buffer for off-policy learners, kept in the trial process (actors only collect).

Transitions are stored as (s, a, r, s', terminated): s' is the true next observation (the final one where
an episode ended), so a transition cut by a time limit is bootstrapped and a terminal one is not.
Sampling uses the buffer's own seeded generator; the whole buffer is part of the trainer's checkpoint.

With `n_step > 1` a sample is the multi-step transition from s (Sutton 1988; Rainbow's n-step targets,
Hessel et al. 2018): the discounted sum of the rewards of up to n steps of the same environment, the
observation after the last of them, whether it was terminal, and `discounts` = gamma^k for the k steps
summed. k is smaller than n where the episode ended (a terminal state or a time limit) or where the buffer
holds no later step yet; a time limit is still bootstrapped, from its final observation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from labfleet.rollout.sampler import Rollout
from labfleet.seeding import rng_state, set_rng_state


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, action_shape: tuple[int, ...],
                 action_dtype: Any, seed: int, *, n_step: int = 1, gamma: float = 1.0, n_envs: int = 1):
        self.capacity = capacity
        self.n_step, self.gamma = n_step, gamma
        self.n_envs = n_envs  # rollouts are stored time-major: an environment's next step is n_envs slots on
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.ends = np.zeros(capacity, dtype=bool)  # the episode ended here: terminated or truncated
        self.position = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def add_rollout(self, rollout: Rollout) -> None:
        """Append a (T, N) rollout in time-major, then environment, order."""
        T, N = rollout.rewards.shape
        if self.n_envs != N:
            raise ValueError(f"a rollout of {N} environments for a buffer of {self.n_envs}")
        flat = {
            "obs": rollout.obs.reshape(T * N, *rollout.obs.shape[2:]),
            "next_obs": rollout.next_obs.reshape(T * N, *rollout.next_obs.shape[2:]),
            "actions": rollout.actions.reshape(T * N, *rollout.actions.shape[2:]),
            "rewards": rollout.rewards.reshape(T * N),
            "terminated": rollout.terminated.reshape(T * N),
            "ends": (rollout.terminated | rollout.truncated).reshape(T * N),
        }
        for k in range(T * N):  # ring buffer: wrap transition by transition
            i = self.position
            for name, values in flat.items():
                getattr(self, name)[i] = values[k]
            self.position = (self.position + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, self.size, size=batch_size)
        names = ("obs", "actions") if self.n_step > 1 else ("obs", "actions", "rewards", "next_obs", "terminated")
        batch = {name: getattr(self, name)[idx] for name in names}
        if self.n_step > 1:
            batch.update(self.n_step_returns(idx))
        return {name: torch.as_tensor(values, device=device) for name, values in batch.items()}

    def n_step_returns(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The n-step transitions from the stored ones at `idx`: rewards, next_obs, terminated, discounts."""
        n = self.n_step
        newer = (self.position - idx - 1) % self.capacity  # transitions written after idx (0: the newest)
        ahead = np.arange(n) * self.n_envs
        at = (idx[:, None] + ahead) % self.capacity  # (B, n): the same environment's next n steps
        # step j is summed while no earlier one ended its episode and the buffer holds it
        stop = self.ends[at[:, :-1]] | (ahead[1:] > newer[:, None])
        going = np.ones(at.shape, dtype=bool)
        going[:, 1:] = np.logical_and.accumulate(~stop, axis=1)
        discounts = np.array([self.gamma ** j for j in range(n)], dtype=np.float32)
        terms = np.where(going, discounts * self.rewards[at], np.float32(0))
        returns = np.zeros(len(idx), dtype=np.float32)
        for j in range(n):  # one step at a time: float32 sums in the order of the rewards
            returns += terms[:, j]
        steps = going.sum(axis=1)
        last = at[np.arange(len(idx)), steps - 1]
        return {"rewards": returns, "next_obs": self.next_obs[last], "terminated": self.terminated[last],
                "discounts": (self.gamma ** steps).astype(np.float32)}

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"obs": torch.from_numpy(self.obs[:n].copy()), "next_obs": torch.from_numpy(self.next_obs[:n].copy()),
                "actions": torch.from_numpy(self.actions[:n].copy()),
                "rewards": torch.from_numpy(self.rewards[:n].copy()),
                "terminated": torch.from_numpy(self.terminated[:n].copy()),
                "ends": torch.from_numpy(self.ends[:n].copy()),
                "position": self.position, "size": self.size, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
            getattr(self, name)[:n] = state[name].numpy()
        # checkpoints from before `ends` was kept: only n-step sampling reads it, and that came with it
        self.ends[:n] = (state["ends"] if "ends" in state else state["terminated"]).numpy()
        self.position, self.size = int(state["position"]), n
        set_rng_state(self.rng, state["rng"])
