"""PPO (Schulman et al. 2017) with the clipped surrogate objective or, with `loss: kl_penalty`, the
adaptive KL penalty of the paper's section 4, and the 13 core implementation details of Huang et al.,
"The 37 Implementation Details of PPO" (ICLR blog track 2022), marked [n]:

  [1] vectorised environments              [8]  clipped surrogate objective
  [2] orthogonal init, constant 0 biases   [9]  value-loss clipping (clip_range_vf)
  [3] Adam with eps = 1e-5                 [10] loss = policy + vf_coef * value - ent_coef * entropy
  [4] learning-rate annealing ("lin_")     [11] global gradient-norm clipping (max_grad_norm)
  [5] GAE                                  [12] approx_kl, clip_fraction, explained_variance
  [6] shuffled minibatches, n_epochs       [13] separate actor and critic networks
  [7] per-minibatch advantage normalisation

One iteration:
  1. collect   n_steps from each of n_envs environments with pi_old                        [1]
  2. estimate  V(s_t), log pi_old(a_t|s_t), GAE advantages A_t, returns R_t = A_t + V(s_t) [5]
  3. for each of n_epochs, for each shuffled minibatch:                                   [6]
       ratio_t   = pi(a_t|s_t) / pi_old(a_t|s_t)
       L_clip    = -mean( min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t) )         [7][8]
         or L_klpen = -mean( ratio_t A_t ) + beta mean( KL[pi_old(.|s_t), pi(.|s_t)] )   (section 4)
       L_value   = mean( max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )         [9]
       loss      = L_clip + vf_coef L_value - ent_coef mean(H[pi])                        [10]
       step (clip the global gradient norm)                                               [11]
     stop early once approx_kl > 1.5 target_kl, if target_kl is set
  4. with the KL penalty: d = mean KL[pi_old, pi] over the rollout after the epochs;
       beta <- beta / 2 if d < kl_target / 1.5,  beta <- beta * 2 if d > kl_target * 1.5
  5. log                                                                                  [12]
The shipped specs use the clipped objective, which the paper found better on MuJoCo (its Table 1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from labfleet import metrics as M
from labfleet.algorithms.optim import LIN_PATTERN, OptimHParams, OptimizerConfig
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import ActorCriticTrainer
from labfleet.algorithms.rl.estimators import gae_advantages
from labfleet.algorithms.rl.fastmlp import FastPPOUpdate
from labfleet.algorithms.rl.networks import PolicyValue, per_sample, policy_kl, standardised
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.sizes import BatchSize, EnvCount, StepCount, Width
from labfleet.rollout.envs import derive_seed
from labfleet.spec.models import ExperimentSpec


class PPOHParams(OptimHParams, ObservationHParams):
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(type="adam", eps=1e-5),
                                       description="Adam with eps 1e-5 [3].")
    n_envs: EnvCount = Field(8, description="Environments stepped together [1].")
    n_steps: StepCount = Field(128, description="Steps per environment per rollout.")
    batch_size: BatchSize = Field(256, description="Minibatch size; at most n_envs * n_steps.")
    n_epochs: PositiveInt = Field(10, description="Passes over each rollout [6].")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE's lambda [5].")
    clip_range: float | str = Field(0.2, description='Surrogate clipping epsilon, or "lin_<value>" [8].')
    clip_range_vf: PositiveFloat | None = Field(None, description="Value clipping around V_old; null: off [9].")
    normalize_advantage: bool = Field(True, description="Standardise advantages per minibatch [7].")
    ent_coef: float = Field(0.0, ge=0, description="Entropy bonus weight [10].")
    vf_coef: float = Field(0.5, ge=0, description="Value loss weight [10].")
    target_kl: PositiveFloat | None = Field(None, description="Stop the epochs once approx_kl > 1.5 target_kl.")
    loss: Literal["clip", "kl_penalty"] = Field("clip", description="The clipped surrogate, or the surrogate with "
                                                "an adaptive KL penalty (paper section 4; clip_range unused).")
    kl_target: PositiveFloat = Field(0.01, description="d_targ of the KL penalty: beta adapts to keep the mean "
                                     "KL near it.")
    kl_coef: PositiveFloat = Field(1.0, description="The KL penalty's initial beta (the paper: it adapts fast, "
                                   "so its start matters little).")
    net_arch: list[Width] = Field(default_factory=lambda: [64, 64], description="Hidden sizes, each net.")
    activation: Literal["tanh", "relu"] = "tanh"

    @field_validator("clip_range")
    @classmethod
    def _clip(cls, value: float | str) -> float | str:
        number = value
        if isinstance(value, str):
            match = LIN_PATTERN.match(value)
            if not match:
                raise ValueError(f'expected a number or "lin_<number>", got {value!r}')
            number = float(match.group(1))
        if not 0 < float(number) < 1:
            raise ValueError(f"the clip range must lie in (0, 1), got {value!r}")
        return value

    @model_validator(mode="after")
    def _batch_fits(self) -> PPOHParams:
        if self.batch_size > self.rollout_size:
            raise ValueError(f"batch_size ({self.batch_size}) exceeds n_envs * n_steps ({self.rollout_size}): "
                             f"lower batch_size or raise n_envs or n_steps")
        return self

    @property
    def rollout_size(self) -> int:
        return self.n_envs * self.n_steps

    def clip_at(self, progress: float) -> float:
        if isinstance(self.clip_range, str):
            match = LIN_PATTERN.match(self.clip_range)
            assert match is not None
            return float(match.group(1)) * (1.0 - min(max(progress, 0.0), 1.0))
        return float(self.clip_range)


def clipped_surrogate_loss(ratio: torch.Tensor, advantages: torch.Tensor,
                           clip_range: float | torch.Tensor) -> torch.Tensor:
    """-E[min(r A, clip(r, 1 - eps, 1 + eps) A)]."""
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)  # type: ignore[arg-type]  # (a number or a tensor)
    return -torch.min(ratio * advantages, clipped * advantages).mean(-1)


def kl_penalty_surrogate_loss(ratio: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor,
                              beta: float | torch.Tensor) -> torch.Tensor:
    """-E[r A] + beta E[KL[pi_old(.|s), pi(.|s)]] (PPO paper, section 4); `kl` is per state."""
    return -(ratio * advantages).mean(-1) + beta * kl.mean(-1)


def adaptive_kl_coef(beta: float, kl: float, kl_target: float) -> float:
    """beta halved when the mean KL fell under kl_target / 1.5, doubled when it rose over 1.5 kl_target."""
    if kl < kl_target / 1.5:
        return beta / 2
    if kl > kl_target * 1.5:
        return beta * 2
    return beta


def clipped_value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
                       clip_range_vf: float | None) -> torch.Tensor:
    """E[(V - R)^2], or with clipping E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]."""
    if clip_range_vf is None:
        return ((values - returns) ** 2).mean(-1)
    clipped = values_old + torch.clamp(values - values_old, -clip_range_vf, clip_range_vf)
    return torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean(-1)


class PPOMinibatch(NamedTuple):
    """One seed's minibatch (B, ...) of a rollout, with what pi_old gave on it."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp_old: torch.Tensor  # log pi_old(a|s)
    advantages: torch.Tensor
    returns: torch.Tensor
    values_old: torch.Tensor  # V_old(s)


class PPOCoefficients(NamedTuple):
    """The hyperparameters a seed may hold its own value of in its minibatch loss: numbers for one seed,
    tensors (N,) for N seeds stacked."""

    clip: float | torch.Tensor  # the surrogate's clipping epsilon now (clip_range, scheduled)
    beta: float | torch.Tensor  # the KL penalty's coefficient now
    vf_coef: float | torch.Tensor
    ent_coef: float | torch.Tensor


Net = Callable[[torch.Tensor, torch.Tensor], PolicyValue]


def ppo_minibatch_loss(net: Net, old_net: Net | None, batch: PPOMinibatch, coef: PPOCoefficients,
                       hp: PPOHParams) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's loss on one minibatch [7]-[10] and its statistics (approx_kl, clip fraction, the three terms;
    without gradient) [12]: `net` is the actor-critic (`ActorCritic`'s call), `old_net` pi_old's for the KL
    penalty (None for the clipped objective). The one definition for one seed and for many: samples (B, ...)
    and numbers for one seed, (N, B, ...) and tensors (N,) for N seeds stacked (`rl/batched.py`)."""
    out = net(batch.obs, batch.actions)
    logratio = out.logp - batch.logp_old
    ratio = logratio.exp()
    a = standardised(batch.advantages) if hp.normalize_advantage else batch.advantages
    clip = per_sample(coef.clip)
    if hp.loss == "kl_penalty":
        assert old_net is not None
        with torch.no_grad():
            old = old_net(batch.obs, batch.actions)
        loss_pi = kl_penalty_surrogate_loss(ratio, a, policy_kl(old.dist, out.dist), coef.beta)
    else:
        loss_pi = clipped_surrogate_loss(ratio, a, clip)
    loss_v = clipped_value_loss(out.value, batch.values_old, batch.returns, hp.clip_range_vf)
    entropy = out.entropy.mean(-1)
    with torch.no_grad():  # http://joschu.net/blog/kl-approx.html
        stats = {"kl": ((ratio - 1) - logratio).mean(-1), "clip": ((ratio - 1).abs() > clip).float().mean(-1),
                 "pi": loss_pi.detach(), "v": loss_v.detach(), "ent": entropy.detach()}
    return loss_pi + coef.vf_coef * loss_v - coef.ent_coef * entropy, stats


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var[target - predicted] / Var[target]: 1 is perfect, 0 no better than the mean."""
    var = torch.var(target)
    return float("nan") if var == 0 else float(1 - torch.var(target - predicted) / var)


class PPOTrainer(ActorCriticTrainer):
    hparams_model = PPOHParams
    hp: PPOHParams
    fast_update = True  # False: every update through autograd (the kernel's tests compare the two)

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)  # separate actor and critic MLPs, orthogonal init [2][13]
        self.shuffle = torch.Generator().manual_seed(derive_seed(seed, "minibatches"))
        self.kl_coef = self.hp.kl_coef  # beta of the KL penalty, adapted every iteration
        # The same loss's gradient in closed form, where the networks are plain MLPs (rl/fastmlp.py)
        self.fast = FastPPOUpdate(self.ac) if self.fast_update and FastPPOUpdate.why_not(self.ac, self.hp) is None \
            else None

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        progress = self.env_steps / self.spec.budget.total
        clip_range = hp.clip_at(progress)

        # 1. collect
        rollout, logged = self.collect(self.actor, hp.n_envs, hp.n_steps)
        obs = self.as_tensor(rollout.obs)  # (T, N, *obs_shape)
        actions = self.as_tensor(rollout.actions)  # (T, N, *act_shape)

        # 2. estimate
        with torch.no_grad():
            pi_old = self.ac(obs, actions)
            values, logp_old = pi_old.value, pi_old.logp  # (T, N) each
            next_values = self.ac.value(self.as_tensor(rollout.next_obs))  # (T, N)
            rewards = self.scale_rewards(self.as_tensor(rollout.rewards))  # with normalize.reward, scaled
            adv = gae_advantages(rewards, values, self.as_tensor(rollout.terminated),
                                 self.as_tensor(rollout.truncated), next_values, hp.gamma, hp.gae_lambda)
            returns = adv + values
        B = rollout.steps
        b_obs, b_actions = obs.reshape(B, *obs.shape[2:]), actions.reshape(B, *actions.shape[2:])
        b_logp_old, b_adv, b_returns, b_values = (x.reshape(B) for x in (logp_old, adv, returns, values))

        # 3. epochs of shuffled minibatches
        old_net = copy.deepcopy(self.ac) if hp.loss == "kl_penalty" else None  # pi_old, for the exact KL
        stats: dict[str, list] = {"pi": [], "v": [], "ent": [], "kl": [], "clip": [], "norm": []}  # 0-d tensors
        coef = PPOCoefficients(clip_range, self.kl_coef, hp.vf_coef, hp.ent_coef)  # fixed for this update
        for _ in range(hp.n_epochs):
            order = torch.randperm(B, generator=self.shuffle).to(self.device)
            for start in range(0, B, hp.batch_size):
                mb = order[start:start + hp.batch_size]
                batch = PPOMinibatch(b_obs[mb], b_actions[mb], b_logp_old[mb], b_adv[mb], b_returns[mb], b_values[mb])
                if self.fast is not None:
                    minibatch_stats = self.fast.gradients(batch, coef, hp)
                    stats["norm"].append(self.optimizer.step_gradients(progress))
                else:
                    loss, minibatch_stats = ppo_minibatch_loss(self.ac, old_net, batch, coef, hp)
                    stats["norm"].append(self.optimizer.step_tensor(loss, progress))
                for key, value in minibatch_stats.items():
                    stats[key].append(value)
            if hp.target_kl is not None and float(stats["kl"][-1]) > 1.5 * hp.target_kl:
                break
        self.iterations += 1
        if old_net is not None:  # 4. adapt beta to the KL this update reached
            with torch.no_grad():
                kl_after = float(policy_kl(old_net(b_obs, b_actions).dist, self.ac(b_obs, b_actions).dist).mean())
            logged[M.PPO_KL] = kl_after
            logged[M.PPO_KL_COEF] = self.kl_coef
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl_after, hp.kl_target)

        # 5. log
        # every statistic read back at once: one host sync an iteration, not one per minibatch
        means = dict(zip(stats, torch.stack([torch.stack(v).float().mean() for v in stats.values()]).tolist(),
                         strict=True))
        logged.update({
            M.LOSS_POLICY: means["pi"], M.LOSS_VALUE: means["v"], M.LOSS_ENTROPY: means["ent"],
            M.PPO_APPROX_KL: means["kl"], M.PPO_CLIP_FRACTION: means["clip"],
            M.GRAD_NORM: means["norm"],
            M.PPO_EXPLAINED_VARIANCE: explained_variance(b_values, b_returns),
            M.LEARNING_RATE: self.optimizer.learning_rate,
        })
        return logged

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shuffle": self.shuffle.get_state(), "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shuffle.set_state(state["shuffle"])
        self.kl_coef = float(state["kl_coef"])


register(AlgorithmInfo(
    name="ppo", kind="rl", hparams=PPOHParams, trainer=PPOTrainer,
    summary="Proximal Policy Optimization (clipped surrogate or adaptive KL penalty), 13 core implementation details",
    mutable_hparams=("learning_rate", "clip_range", "ent_coef", "vf_coef", "gae_lambda", "max_grad_norm", "n_epochs",
                     "target_kl"),
    observation_spaces=("vector", "discrete", "image"),
    seed_group="labfleet.algorithms.rl.batched:BatchedPPO",
    per_seed_hparams=(
        "learning_rate", "lr_schedule", "max_grad_norm", "clip_range", "gamma", "gae_lambda", "ent_coef", "vf_coef",
        "n_epochs", "target_kl", "kl_target", "kl_coef"),
    group_hparams=(
        "optimizer", "normalize", "encoder", "encoder_kwargs", "net_arch", "activation", "n_envs", "n_steps",
        "batch_size", "clip_range_vf", "normalize_advantage", "loss"),
))
