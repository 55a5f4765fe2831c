"""A user's own `labfleet.Trainer` subclass: epsilon-greedy on a 10-armed Gaussian bandit (Sutton and Barto,
section 2.3), with its own pydantic hyperparameters. It runs, checkpoints and sweeps like a built-in.

    labfleet run experiments/custom/bandit_trainer.yaml
    labfleet show bandit_trainer:EpsilonGreedyBandit      # from experiments/custom/
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from labfleet import Trainer
from labfleet.algorithms.base import rng_state, set_rng_state


class BanditHParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arms: int = Field(10, gt=1, description="Arms; their true values are drawn from N(0, 1) by the seed.")
    epsilon: float = Field(0.1, ge=0, le=1, description="Probability of a uniformly random arm.")
    pulls_per_iteration: int = Field(100, gt=0, description="Pulls between two reports.")


class EpsilonGreedyBandit(Trainer):
    """Epsilon-greedy sample averages on a Gaussian bandit."""

    hparams_model = BanditHParams

    def __init__(self, spec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        self.rng = np.random.default_rng(seed)
        self.true_values = self.rng.standard_normal(self.hp.arms)
        self.estimates = np.zeros(self.hp.arms)
        self.counts = np.zeros(self.hp.arms)
        self.pulls = 0

    def train_iteration(self) -> dict[str, float]:
        rewards = []
        for _ in range(self.hp.pulls_per_iteration):
            arm = int(self.rng.integers(self.hp.arms)) if self.rng.random() < self.hp.epsilon \
                else int(np.argmax(self.estimates))
            reward = self.true_values[arm] + self.rng.standard_normal()
            self.counts[arm] += 1
            self.estimates[arm] += (reward - self.estimates[arm]) / self.counts[arm]
            rewards.append(reward)
        self.pulls += self.hp.pulls_per_iteration
        return {"train/reward": float(np.mean(rewards))}

    def evaluate(self) -> dict[str, float]:
        best = int(np.argmax(self.true_values))
        return {"eval/optimal_arm": float(np.argmax(self.estimates) == best),
                "eval/regret": float(self.true_values[best] - self.true_values[int(np.argmax(self.estimates))])}

    @property
    def progress(self) -> int:
        return self.pulls

    def probe(self) -> np.ndarray:
        return np.argsort(self.estimates)

    def state_dict(self) -> dict[str, Any]:
        return {"estimates": torch.from_numpy(self.estimates.copy()), "counts": torch.from_numpy(self.counts.copy()),
                "pulls": self.pulls, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimates[...] = state["estimates"].numpy()
        self.counts[...] = state["counts"].numpy()
        self.pulls = int(state["pulls"])
        set_rng_state(self.rng, state["rng"])
