"""Trust Region Policy Optimization (Schulman et al. 2015), in the form of its appendix C and of
sb3-contrib's TRPO (the peer whose hyperparameter names it takes): a natural-gradient step on the
surrogate, scaled to the trust region and checked by a backtracking line search.

One iteration:
  1. collect   n_steps from each of n_envs environments with pi_old
  2. estimate  V(s_t), GAE advantages A_t (normalised over the rollout), returns R_t = A_t + V(s_t)
  3. policy    L(theta)  = mean( pi_theta(a|s) / pi_old(a|s) A )              (the surrogate; g = grad L)
               F         = Hessian of mean KL[pi_old(.|s), pi_theta(.|s)] at theta_old (the Fisher matrix),
                           applied as a product F v by double backpropagation, plus cg_damping * v
               x         ~ F^-1 g by cg_max_steps steps of conjugate gradient
               step      = sqrt(2 delta / x^T F x) x                          (delta = target_kl: the
                           largest step whose quadratic KL model stays inside the trust region)
               line search: theta_old + shrink^k step for k = 0, 1, ..., the first whose real KL is at
                           most delta and whose surrogate improved; none: theta stays theta_old
  4. value     n_critic_updates passes of minibatch regression of V on R_t (Adam at learning_rate)
  5. log
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from labfleet import metrics as M
from labfleet.algorithms.optim import OptimHParams, OptimizerConfig, ScheduledOptimizer
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import ActorCriticTrainer
from labfleet.algorithms.rl.estimators import gae_advantages
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.sizes import BatchSize, EnvCount, StepCount, Width
from labfleet.rollout.envs import derive_seed
from labfleet.spec.models import ExperimentSpec


class TRPOHParams(OptimHParams, ObservationHParams):
    learning_rate: float | str = Field(1e-3, description='The value function\'s Adam step size, or "lin_<value>".')
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(type="adam"),
                                       description="The value function's optimiser.")
    max_grad_norm: PositiveFloat | None = Field(None, description="Clip the value function's gradient; null: off.")
    n_envs: EnvCount = Field(2, description="Environments stepped together.")
    n_steps: StepCount = Field(512, description="Steps per environment per rollout.")
    batch_size: BatchSize = Field(128, description="Minibatch size of the value regression.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE's lambda.")
    target_kl: PositiveFloat = Field(0.01, description="delta: the trust region's bound on the mean KL.")
    cg_max_steps: PositiveInt = Field(15, description="Conjugate-gradient steps for F^-1 g.")
    cg_damping: float = Field(0.1, ge=0, description="Added to the Fisher matrix's diagonal (F + lambda I).")
    line_search_shrinking_factor: float = Field(0.8, gt=0, lt=1, description="Backtracking factor.")
    line_search_max_iter: PositiveInt = Field(10, description="Step sizes tried before giving up.")
    n_critic_updates: PositiveInt = Field(10, description="Passes of value regression per rollout.")
    normalize_advantage: bool = Field(True, description="Standardise advantages over the rollout.")
    net_arch: list[Width] = Field(default_factory=lambda: [64, 64], description="Hidden sizes, each net.")
    activation: Literal["tanh", "relu"] = "tanh"

    @model_validator(mode="after")
    def _batch_fits(self) -> TRPOHParams:
        if self.batch_size > self.n_envs * self.n_steps:
            raise ValueError(f"batch_size ({self.batch_size}) exceeds n_envs * n_steps "
                             f"({self.n_envs * self.n_steps}): lower batch_size or raise n_envs or n_steps")
        return self


def conjugate_gradient(fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, max_steps: int,
                       residual_tol: float = 1e-10) -> torch.Tensor:
    """x with F x ~ b for a symmetric positive-definite F given only as the product v -> F v (Hestenes and
    Stiefel 1952); exact after dim(b) steps in exact arithmetic."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # residual b - F x, search direction
    rr = r @ r
    for _ in range(max_steps):
        if rr < residual_tol:
            break
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x


def trust_region_step(x: torch.Tensor, fx: torch.Tensor, max_kl: float) -> torch.Tensor:
    """x scaled so that the quadratic model of the KL, 1/2 s^T F s, equals max_kl: sqrt(2 delta / x^T F x) x."""
    return x * math.sqrt(2 * max_kl / max(float(x @ fx), 1e-12))


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], max_kl: float, shrink: float,
                             max_iter: int) -> tuple[float, int]:
    """(coefficient, tries): the first of 1, shrink, shrink^2, ... whose `evaluate(coef) -> (surrogate
    improvement, mean KL)` improves the surrogate within the KL bound, and how many were tried; coefficient 0
    when none did (the caller keeps the old parameters)."""
    coef = 1.0
    for tries in range(1, max_iter + 1):
        improvement, kl = evaluate(coef)
        if kl <= max_kl and improvement > 0:
            return coef, tries
        coef *= shrink
    return 0.0, max_iter


class TRPOTrainer(ActorCriticTrainer):
    hparams_model = TRPOHParams
    hp: TRPOHParams

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        # The policy moves by the natural-gradient step; only the value net has an optimiser.
        self.optimizer = ScheduledOptimizer(self.ac.value_net.parameters(), self.hp)
        self.shuffle = torch.Generator().manual_seed(derive_seed(seed, "minibatches"))

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        progress = self.env_steps / self.spec.budget.total
        policy = self.ac.policy
        params = [p for p in policy.parameters() if p.requires_grad]

        # 1. collect
        rollout, logged = self.collect(self.actor, hp.n_envs, hp.n_steps)
        B = rollout.steps
        obs = self.as_tensor(rollout.obs).reshape(B, *rollout.obs.shape[2:])
        actions = self.as_tensor(rollout.actions).reshape(B, *rollout.actions.shape[2:])

        # 2. estimate
        with torch.no_grad():
            values = self.ac.value(obs).reshape(rollout.rewards.shape)  # (T, N)
            next_values = self.ac.value(self.as_tensor(rollout.next_obs))  # (T, N)
            rewards = self.scale_rewards(self.as_tensor(rollout.rewards))  # with normalize.reward, scaled
            adv = gae_advantages(rewards, values, self.as_tensor(rollout.terminated),
                                 self.as_tensor(rollout.truncated), next_values, hp.gamma, hp.gae_lambda)
            returns = (adv + values).reshape(B)
            adv = adv.reshape(B)
            if hp.normalize_advantage and B > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            logp_old, _ = policy.log_prob_entropy(obs, actions)
            old = policy.distribution(obs)

        def surrogate_and_kl() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logp, entropy = policy.log_prob_entropy(obs, actions)
            kl = torch.distributions.kl_divergence(old, policy.distribution(obs)).mean()
            return ((logp - logp_old).exp() * adv).mean(), kl, entropy.mean()

        # 3. the policy step
        surrogate, kl, entropy = surrogate_and_kl()
        g = parameters_to_vector(torch.autograd.grad(surrogate, params, retain_graph=True))
        kl_grad = parameters_to_vector(torch.autograd.grad(kl, params, create_graph=True))

        def fvp(v: torch.Tensor) -> torch.Tensor:  # (F + damping I) v, F the KL's Hessian at theta_old
            hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
            return parameters_to_vector(hv) + hp.cg_damping * v

        x = conjugate_gradient(fvp, g, hp.cg_max_steps)
        step = trust_region_step(x, fvp(x), hp.target_kl)
        theta_old = parameters_to_vector(params).detach()
        surrogate_old = float(surrogate.detach())

        def try_step(coef: float) -> tuple[float, float]:
            vector_to_parameters(theta_old + coef * step, params)
            with torch.no_grad():
                new_surrogate, new_kl, _ = surrogate_and_kl()
            return float(new_surrogate) - surrogate_old, float(new_kl)

        coef, tries = backtracking_line_search(try_step, hp.target_kl, hp.line_search_shrinking_factor,
                                               hp.line_search_max_iter)
        vector_to_parameters(theta_old + coef * step, params)
        with torch.no_grad():
            surrogate_new, kl_new, _ = surrogate_and_kl()

        # 4. value regression
        value_losses, norms = [], []
        for _ in range(hp.n_critic_updates):
            order = torch.randperm(B, generator=self.shuffle).to(self.device)
            for start in range(0, B, hp.batch_size):
                mb = order[start:start + hp.batch_size]
                loss_v = ((self.ac.value(obs[mb]) - returns[mb]) ** 2).mean()
                norms.append(self.optimizer.step(loss_v, progress))
                value_losses.append(loss_v.detach())
        self.iterations += 1

        # 5. log
        logged.update({
            M.LOSS_POLICY: -float(surrogate_new), M.LOSS_VALUE: float(torch.stack(value_losses).mean()),
            M.LOSS_ENTROPY: float(entropy.detach()), M.TRPO_KL: float(kl_new), M.TRPO_STEP_COEF: coef,
            M.TRPO_LINE_SEARCH_TRIES: float(tries), M.TRPO_IMPROVEMENT: float(surrogate_new) - surrogate_old,
            M.GRAD_NORM: float(np.mean(norms)), M.LEARNING_RATE: self.optimizer.learning_rate,
        })
        return logged

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shuffle.set_state(state["shuffle"])


register(AlgorithmInfo(
    name="trpo", kind="rl", hparams=TRPOHParams, trainer=TRPOTrainer,
    summary="Trust Region Policy Optimization: conjugate-gradient natural step, KL line search, GAE",
    observation_spaces=("vector", "discrete", "image"),
))
