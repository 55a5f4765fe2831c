"""Your own environment wrappers: any `gymnasium.Wrapper` subclass, named in a spec's `env_wrappers` as
`module:Class` (this file's directory is on the path, as for `env:` and `algorithm:`) and built as
`Class(env, **kwargs)` around every env instance: training, rollout workers and evaluation."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym


class RewardScale(gym.RewardWrapper):
    """Multiplies every reward by `scale` (a constant YAML can state, unlike TransformReward's function)."""

    def __init__(self, env: gym.Env, scale: float = 1.0):
        super().__init__(env)
        self.scale = float(scale)

    def reward(self, reward: SupportsFloat) -> float:
        return float(reward) * self.scale


class ActionRepeat(gym.Wrapper):
    """Repeats each action `repeat` times and sums the rewards (frame skipping for any env)."""

    def __init__(self, env: gym.Env, repeat: int = 2):
        super().__init__(env)
        if repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {repeat}")
        self.repeat = int(repeat)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info
