"""REINFORCE with a learned state-value baseline (Williams 1992; Sutton & Barto 2018, section 13.4).

One iteration, in the order of the pseudocode:
  1. collect   n_steps from each of n_envs environments with pi_theta
  2. estimate  the reward-to-go G_t (discounted; an episode cut by a time limit or by the end of the
               rollout is completed with V_phi of its true next state; a terminated one is not)
  3. loss      policy:   -mean( log pi_theta(a_t|s_t) * (G_t - V_phi(s_t)) )   (the baseline is held
                         constant, so it lowers variance without biasing the gradient)
               value:    mean( (V_phi(s_t) - G_t)^2 )
               entropy:  -ent_coef * mean( H[pi_theta(.|s_t)] )  (0 by default)
  4. step      one gradient step on policy + vf_coef * value + entropy terms (separate networks)
  5. log
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from labfleet import metrics as M
from labfleet.algorithms.optim import OptimHParams
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import ActorCriticTrainer
from labfleet.algorithms.rl.estimators import discounted_returns
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.sizes import EnvCount, StepCount, Width


class ReinforceHParams(OptimHParams, ObservationHParams):
    learning_rate: float | str = Field(1e-3, description='Initial learning rate, or "lin_<value>".')
    n_envs: EnvCount = Field(8, description="Environments stepped together.")
    n_steps: StepCount = Field(128, description="Steps per environment per update.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the baseline's squared error in the loss.")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    normalize_advantage: bool = Field(True, description="Standardise G_t - V(s_t) over the batch.")
    net_arch: list[Width] = Field(default_factory=lambda: [64, 64], description="Hidden layer sizes.")
    activation: Literal["tanh", "relu"] = "tanh"


def reinforce_policy_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-E[log pi(a|s) * A]: its gradient is the REINFORCE estimate of -grad J."""
    return -(logp * advantages.detach()).mean()


def value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    return ((values - returns) ** 2).mean()


class ReinforceTrainer(ActorCriticTrainer):
    hparams_model = ReinforceHParams
    hp: ReinforceHParams


    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        # 1. collect
        rollout, logged = self.collect(self.actor, hp.n_envs, hp.n_steps)
        obs = self.as_tensor(rollout.obs)  # (T, N, *obs_shape)
        actions = self.as_tensor(rollout.actions)  # (T, N, *act_shape)
        rewards = self.scale_rewards(self.as_tensor(rollout.rewards))  # (T, N)

        # 2. estimate: reward-to-go, bootstrapped only where an episode was cut, not where it ended
        with torch.no_grad():
            next_values = self.ac.value(self.as_tensor(rollout.next_obs))  # (T, N)
        returns = discounted_returns(rewards, self.as_tensor(rollout.terminated), self.as_tensor(rollout.truncated),
                                     next_values, hp.gamma)

        # 3. loss
        values = self.ac.value(obs)
        advantages = returns - values.detach()
        if hp.normalize_advantage and advantages.numel() > 1:  # the std of one value is undefined
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        logp, entropies = self.ac.policy.log_prob_entropy(obs, actions)  # (T, N) each
        entropy = entropies.mean()
        loss_pi = reinforce_policy_loss(logp, advantages)
        loss_v = value_loss(values, returns)
        loss = loss_pi + hp.vf_coef * loss_v - hp.ent_coef * entropy

        # 4. step
        grad_norm = self.optimizer.step(loss, self.env_steps / self.spec.budget.total)
        self.iterations += 1

        # 5. log
        logged.update({M.LOSS_POLICY: loss_pi.item(), M.LOSS_VALUE: loss_v.item(), M.LOSS_ENTROPY: entropy.item(),
                       M.GRAD_NORM: grad_norm, M.LEARNING_RATE: self.optimizer.learning_rate})
        return logged


register(AlgorithmInfo(
    name="reinforce", kind="rl", hparams=ReinforceHParams, trainer=ReinforceTrainer,
    summary="REINFORCE (Monte Carlo policy gradient) with a learned state-value baseline",
    mutable_hparams=("learning_rate", "ent_coef", "vf_coef", "max_grad_norm"),
    observation_spaces=("vector", "discrete", "image"),
))
