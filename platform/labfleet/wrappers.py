"""Environment wrappers that published setups use and gymnasium does not ship, for `env_wrappers` as
`labfleet.wrappers:Name`."""

from __future__ import annotations

from typing import Any

import gymnasium as gym


class FireReset(gym.Wrapper):
    """Presses FIRE (action 1) once after every reset, for Atari games that wait for it to start (Breakout):
    the reset of the "Atari wrappers" of Mnih et al. (2015) as SB3 and CleanRL keep them. Without it a
    greedy policy that never fires plays a frozen game until the time limit."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings() if hasattr(env.unwrapped, "get_action_meanings") else []
        if len(meanings) < 2 or meanings[1] != "FIRE":
            raise ValueError(f"FireReset needs an Atari game whose action 1 is FIRE; this one has {meanings}")

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:  # cannot happen in a real game; keep the contract if it does
            obs, info = self.env.reset(**kwargs)
        return obs, info
