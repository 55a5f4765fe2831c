"""Observation and reward normalisation by running statistics (as Stable-Baselines3's `VecNormalize` and
CleanRL's continuous PPO do), kept by the trainer so that where environments are stepped changes nothing.

Observations:  o' = clip((o - mu) / sqrt(var + eps), -clip_obs, clip_obs)
  mu and var are the running mean and variance of every observation collected so far. They are buffers of
  an `ObservationNormalizer` module that sits inside the networks' observation encoders, so they travel
  to rollout workers with the policy's state, are part of every checkpoint, and stay frozen during
  evaluation: only the trainer updates them, once per rollout, from the whole rollout in environment
  order (so W rollout workers give the statistics one process gives).
Rewards:       r' = clip(r / sqrt(var_R + eps), -clip_reward, clip_reward)
  var_R is the running variance of each environment's discounted return R_t = gamma R_{t-1} + r_t (reset
  where an episode ends), as `VecNormalize` keeps it; rewards are scaled, not centred. On-policy learners
  scale a rollout's rewards once the rollout is counted; off-policy learners store rewards as they came and
  scale the ones they sample with the current statistics.
Logged returns (`train/episode_return`, `eval/*`) are always the environment's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator
from torch import nn


class NormalizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    obs: bool = Field(False, description="Normalise observations by their running mean and variance.")
    reward: bool = Field(False, description="Scale rewards by the running std of the discounted return.")
    clip_obs: PositiveFloat = Field(10.0, description="Clip normalised observations to +-clip_obs.")
    clip_reward: PositiveFloat = Field(10.0, description="Clip scaled rewards to +-clip_reward.")
    epsilon: PositiveFloat = Field(1e-8, description="Added to the variance before the square root.")


class ObservationHParams(BaseModel):
    """Mixed into the hyperparameters of the deep RL learners (PPO, A2C, REINFORCE, TRPO, DQN, DDPG)."""

    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Running normalisation: "
                                       "{obs, reward, clip_obs, clip_reward, epsilon}; `true` turns on both.")
    encoder: str = Field("auto", pattern=r"^(auto|flatten|nature_cnn|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
                         description="Observation encoder: nature_cnn (Mnih et al. 2015) for images, flatten for "
                         "vectors; auto picks nature_cnn for uint8 image observations; or package.module:Class, "
                         "your own torch.nn.Module built as Class(observation_space, **encoder_kwargs) with a "
                         "`features_dim` attribute (the heads labfleet puts on it take that many features).")
    encoder_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of your own "
                                           "encoder class (with `encoder: package.module:Class`).")

    @field_validator("normalize", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # rl-zoo's `normalize: true`
            return {"obs": value, "reward": value}
        return value


class RunningMeanStd(nn.Module):
    """Mean and (population) variance of every sample seen, merged batch by batch (Chan et al. 1979)."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: tuple[int, ...] = ()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))  # VecNormalize's prior weight

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        """batch: (B, *shape)."""
        batch = batch.to(self.mean.device, torch.float64)
        n = batch.shape[0]
        batch_mean, batch_var = batch.mean(0), batch.var(0, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class ObservationNormalizer(nn.Module):
    """The observation half: a module the encoders call first, shared by every network of a trainer."""

    def __init__(self, shape: tuple[int, ...], clip: float, epsilon: float):
        super().__init__()
        self.rms = RunningMeanStd(shape)
        self.clip, self.epsilon = clip, epsilon

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        normalised = (obs.double() - self.rms.mean) / torch.sqrt(self.rms.var + self.epsilon)
        return normalised.clamp(-self.clip, self.clip).float()

    def update(self, obs: np.ndarray) -> None:
        """obs: (T, N, *shape) raw observations of one rollout."""
        # A copy: a rollout from a worker is a read-only view of Ray's object store.
        self.rms.update(torch.from_numpy(np.array(obs, dtype=np.float64)).reshape(-1, *self.rms.mean.shape))


class RewardScaler:
    """The reward half: each environment's running discounted return and the variance of those returns."""

    def __init__(self, gamma: float, clip: float, epsilon: float):
        self.gamma, self.clip, self.epsilon = gamma, clip, epsilon
        self.rms = RunningMeanStd(())
        self.returns: np.ndarray | None = None  # (N,) float64

    def observe(self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> None:
        """Advance the returns through a (T, N) rollout and merge them into the statistics."""
        if self.returns is None or self.returns.shape != rewards.shape[1:]:
            self.returns = np.zeros(rewards.shape[1:])
        seen = np.empty(rewards.shape)
        for t in range(rewards.shape[0]):
            self.returns = self.returns * self.gamma + rewards[t]
            seen[t] = self.returns
            self.returns[terminated[t] | truncated[t]] = 0.0
        self.rms.update(torch.from_numpy(seen.reshape(-1)))

    def scale(self, rewards: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.rms.var + self.epsilon).to(rewards.device)
        return (rewards / std).clamp(-self.clip, self.clip).to(rewards.dtype)

    def restart(self) -> None:
        """Environments restart (a restored trainer): so do their returns."""
        self.returns = None

    def state_dict(self) -> dict[str, Any]:
        return {"rms": self.rms.state_dict(),
                "returns": None if self.returns is None else torch.from_numpy(self.returns.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rms.load_state_dict(state["rms"])
        self.returns = None if state["returns"] is None else state["returns"].numpy().copy()
