"""A2C: synchronous advantage actor-critic (Mnih et al. 2016, the synchronous variant).

One iteration:
  1. collect   n_steps from each of n_envs environments with pi_theta
  2. estimate  the bootstrapped advantage: with gae_lambda = 1 (the default) the n-step return
               A_t = r_t + gamma r_{t+1} + ... + gamma^k V(s_{t+k}) - V(s_t), cut at episode ends;
               with n_steps = 1 it is the one-step TD error r + gamma V(s') - V(s)
  3. loss      policy:  -mean( log pi_theta(a_t|s_t) * A_t )
               value:   mean( (V(s_t) - R_t)^2 ) with R_t = A_t + V(s_t)
               entropy: -ent_coef * mean( H[pi_theta(.|s_t)] )
  4. step      one gradient step (RMSprop with eps 1e-5, as Stable-Baselines3 and the paper)
  5. log
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from labfleet.algorithms.optim import OptimHParams, OptimizerConfig
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import flatten
from labfleet.algorithms.rl.estimators import gae_advantages
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.rl.reinforce import PolicyGradientBatch, PolicyGradientTrainer
from labfleet.algorithms.sizes import EnvCount, StepCount, Width


class A2CHParams(OptimHParams, ObservationHParams):
    learning_rate: float | str = Field(7e-4, description='Initial learning rate, or "lin_<value>".')
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(type="rmsprop", eps=1e-5, alpha=0.99),
                                       description="RMSprop(alpha 0.99, eps 1e-5), as SB3.")
    n_envs: EnvCount = Field(8, description="Environments stepped together.")
    n_steps: StepCount = Field(5, description="Steps per environment per update (the n of n-step returns).")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(1.0, ge=0, le=1, description="1: n-step returns; < 1: GAE.")
    ent_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    vf_coef: float = Field(0.5, ge=0, description="Value loss weight.")
    normalize_advantage: bool = Field(False, description="Standardise advantages over the batch.")
    net_arch: list[Width] = Field(default_factory=lambda: [64, 64], description="Hidden sizes, each net.")
    activation: Literal["tanh", "relu"] = "tanh"


class A2CTrainer(PolicyGradientTrainer):
    hparams_model = A2CHParams
    hp: A2CHParams


    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        # 1. collect
        rollout, logged = self.collect(self.actor, hp.n_envs, hp.n_steps)
        obs = self.as_tensor(rollout.obs)  # (T, N, *obs_shape)

        # 2. estimate
        with torch.no_grad():
            values = self.ac.value(obs)  # (T, N)
            next_values = self.ac.value(self.as_tensor(rollout.next_obs))
            rewards = self.scale_rewards(self.as_tensor(rollout.rewards))  # with normalize.reward, scaled
            adv = gae_advantages(rewards, values, self.as_tensor(rollout.terminated),
                                 self.as_tensor(rollout.truncated), next_values, hp.gamma, hp.gae_lambda)

        # 3. loss, 4. step
        batch = PolicyGradientBatch(*(flatten(t) for t in (obs, self.as_tensor(rollout.actions), adv, adv + values)))
        logged.update(self.policy_gradient_step(batch))
        self.iterations += 1
        return logged  # 5. log


register(AlgorithmInfo(
    name="a2c", kind="rl", hparams=A2CHParams, trainer=A2CTrainer,
    summary="Synchronous advantage actor-critic with n-step (or GAE) advantages",
    mutable_hparams=("learning_rate", "ent_coef", "vf_coef", "gae_lambda", "max_grad_norm"),
    observation_spaces=("vector", "discrete", "image"),
    seed_group="labfleet.algorithms.rl.batched:BatchedA2C",
    per_seed_hparams=(
        "learning_rate", "lr_schedule", "max_grad_norm", "gamma", "gae_lambda", "ent_coef", "vf_coef"),
    group_hparams=(
        "optimizer", "normalize", "encoder", "encoder_kwargs", "net_arch", "activation", "n_envs", "n_steps",
        "normalize_advantage"),
))
