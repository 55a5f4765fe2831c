"""Your own environment: any `gymnasium.Env` subclass, named in a spec as `env: module:Class` (this file's
directory is on the path, for the trainers' Ray workers too) and built with `env_kwargs`.

A corridor of `length` cells: the agent starts at the left end and moves left or right; reaching the right
end pays 1, every step costs `step_cost`. Observations are the position scaled to [0, 1].

`get_env_state` / `set_env_state` opt in to exact resume: a checkpoint then carries the corridor mid-episode
(plain data: numbers, strings, lists, dicts, tensors), and a restarted seed goes on exactly where it stopped.
Without them, a restored trainer starts fresh episodes and its run is tagged `labfleet.resume=approximate`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, length: int = 10, step_cost: float = 0.01):
        if length < 2:
            raise ValueError(f"length must be at least 2, got {length}")
        self.length, self.step_cost = int(length), float(step_cost)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)  # 0: left, 1: right
        self.position = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.position / (self.length - 1)], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.position = 0
        return self._obs(), {}

    def get_env_state(self) -> dict[str, Any]:
        return {"position": self.position}  # (its random generator, unused here, would belong too)

    def set_env_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def step(self, action: Any):
        self.position = int(np.clip(self.position + (1 if int(action) == 1 else -1), 0, self.length - 1))
        arrived = self.position == self.length - 1
        return self._obs(), (1.0 if arrived else 0.0) - self.step_cost, arrived, False, {}
