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

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field

from labfleet import metrics as M
from labfleet.algorithms.optim import OptimHParams
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import ActorCriticTrainer, flatten
from labfleet.algorithms.rl.estimators import discounted_returns
from labfleet.algorithms.rl.fastmlp import FastPolicyGradientUpdate
from labfleet.algorithms.rl.networks import PolicyValue, standardised
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.sizes import EnvCount, StepCount, Width
from labfleet.spec.models import ExperimentSpec


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
    return -(logp * advantages.detach()).mean(-1)


def value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    return ((values - returns) ** 2).mean(-1)


class PolicyGradientBatch(NamedTuple):
    """A rollout flattened (B, ...), with its advantages and returns (no gradient); (N, B, ...) for N seeds."""

    obs: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def policy_gradient_loss(net: Callable[[torch.Tensor, torch.Tensor], PolicyValue], batch: PolicyGradientBatch,
                         vf_coef: float | torch.Tensor, ent_coef: float | torch.Tensor, normalize_advantage: bool
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of REINFORCE and A2C, which differ only in their advantages:
    -mean(log pi(a|s) A) + vf_coef mean((V(s) - R)^2) - ent_coef mean(H[pi(.|s)]), with A standardised over
    the batch if asked; and its three terms (without gradient). `net` is the actor-critic (`ActorCritic`'s
    call). The one definition for one seed and for many: numbers and samples (B, ...) for one seed, tensors
    (N,) and (N, B, ...) for N seeds stacked."""
    out = net(batch.obs, batch.actions)
    a = standardised(batch.advantages) if normalize_advantage else batch.advantages
    loss_pi = reinforce_policy_loss(out.logp, a)
    loss_v = value_loss(out.value, batch.returns)
    entropy = out.entropy.mean(-1)
    stats = {"pi": loss_pi.detach(), "v": loss_v.detach(), "ent": entropy.detach()}
    return loss_pi + vf_coef * loss_v - ent_coef * entropy, stats


class PolicyGradientTrainer(ActorCriticTrainer):
    """REINFORCE and A2C: one gradient step of `policy_gradient_loss` an iteration, its gradient in closed
    form where the networks are plain MLPs (rl/fastmlp.py), through autograd otherwise."""

    fast_update = True  # False: every update through autograd (the kernel's tests compare the two)

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        self.fast = FastPolicyGradientUpdate(self.ac) \
            if self.fast_update and FastPolicyGradientUpdate.why_not(self.ac) is None else None

    def policy_gradient_step(self, batch: PolicyGradientBatch) -> dict[str, float]:
        """One step on the batch's loss; what it logs (the three terms, the gradient norm, the learning rate)."""
        hp: Any = self.hp
        progress = self.env_steps / self.spec.budget.total
        if self.fast is not None:
            terms = self.fast.gradients(batch, hp.vf_coef, hp.ent_coef, hp.normalize_advantage)
            norm = self.optimizer.step_gradients(progress)
        else:
            loss, terms = policy_gradient_loss(self.ac, batch, hp.vf_coef, hp.ent_coef, hp.normalize_advantage)
            norm = self.optimizer.step_tensor(loss, progress)
        pi, v, ent, grad_norm = torch.stack([terms["pi"], terms["v"], terms["ent"], norm.float()]).tolist()
        return {M.LOSS_POLICY: pi, M.LOSS_VALUE: v, M.LOSS_ENTROPY: ent, M.GRAD_NORM: grad_norm,
                M.LEARNING_RATE: self.optimizer.learning_rate}


class ReinforceTrainer(PolicyGradientTrainer):
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
            returns = discounted_returns(rewards, self.as_tensor(rollout.terminated),
                                         self.as_tensor(rollout.truncated), next_values, hp.gamma)
            advantages = returns - self.ac.value(obs)

        # 3. loss, 4. step
        batch = PolicyGradientBatch(*(flatten(t) for t in (obs, actions, advantages, returns)))
        logged.update(self.policy_gradient_step(batch))
        self.iterations += 1
        return logged  # 5. log


register(AlgorithmInfo(
    name="reinforce", kind="rl", hparams=ReinforceHParams, trainer=ReinforceTrainer,
    summary="REINFORCE (Monte Carlo policy gradient) with a learned state-value baseline",
    mutable_hparams=("learning_rate", "ent_coef", "vf_coef", "max_grad_norm"),
    observation_spaces=("vector", "discrete", "image"),
    seed_group="labfleet.algorithms.rl.batched:BatchedReinforce",
    per_seed_hparams=(
        "learning_rate", "lr_schedule", "max_grad_norm", "gamma", "ent_coef", "vf_coef"),
    group_hparams=(
        "optimizer", "normalize", "encoder", "encoder_kwargs", "net_arch", "activation", "n_envs", "n_steps",
        "normalize_advantage"),
))
