"""CartPole whose step costs `step_cost_ms` of busy CPU time, like a simulator (not a sleep)."""

from __future__ import annotations

import time

from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class SlowCartPole(CartPoleEnv):
    def __init__(self, step_cost_ms: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.step_cost = step_cost_ms / 1000.0

    def step(self, action):
        end = time.perf_counter() + self.step_cost
        while time.perf_counter() < end:
            pass
        return super().step(action)
