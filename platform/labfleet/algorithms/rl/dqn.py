"""DQN (Mnih et al. 2015), with the Double DQN target (van Hasselt et al. 2016) or Munchausen DQN's
(Vieillard et al. 2020) as options.

One iteration:
  1. collect   train_freq steps from each of n_envs environments, epsilon-greedy on Q_theta (uniformly
               random actions until learning_starts); store (s, a, r, s', terminated) in the replay buffer
  2. for each of gradient_steps minibatches from the buffer (once learning_starts steps are collected):
       target  y = r + gamma * Q_targ(s', argmax_a' Q(s', a')) * (1 - terminated)
               where the inner argmax uses Q_targ (DQN) or Q_theta (Double DQN); with `n_step: n`, r is the
               discounted sum of up to n rewards, s' the state after them and gamma gamma^k for the k summed
               (see ReplayBuffer); with `munchausen: alpha`
               (M-DQN) y = r + alpha * clip(tau ln pi(a|s), l0, 0) + gamma * tau lse(Q_targ(s') / tau) instead,
               pi = softmax(Q_targ / tau) (see `munchausen_targets`)
       loss    Huber(Q_theta(s, a) - y) (or the squared error)
       step    (clip the global gradient norm)
  3. every target_update_interval env steps: theta_targ <- tau * theta + (1 - tau) * theta_targ
  4. log
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from labfleet import metrics as M
from labfleet.algorithms.optim import OptimHParams, ScheduledOptimizer
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import RLTrainer, seeded_torch
from labfleet.algorithms.rl.estimators import polyak_update, td_target
from labfleet.algorithms.rl.exploration import EpsilonGreedyHParams, EpsilonGreedyNet
from labfleet.algorithms.rl.fastmlp import FastDQNUpdate
from labfleet.algorithms.rl.networks import ObservationEncoder, mlp
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.sizes import BatchSize, BufferSize, EnvCount, Width
from labfleet.rollout.envs import derive_seed
from labfleet.rollout.replay import ReplayBuffer
from labfleet.spec.models import ExperimentSpec


class DQNHParams(OptimHParams, EpsilonGreedyHParams, ObservationHParams):
    learning_rate: float | str = Field(1e-4, description='Initial learning rate, or "lin_<value>".')
    max_grad_norm: float | None = Field(10.0, gt=0, description="Clip the global gradient norm; null: off.")
    n_envs: EnvCount = Field(1, description="Environments stepped together.")
    buffer_size: BufferSize = Field(100_000, description="Replay buffer capacity (transitions).")
    learning_starts: int = Field(100, ge=0, description="Env steps of random actions before learning.")
    batch_size: BatchSize = Field(32, description="Minibatch size.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    tau: float = Field(1.0, gt=0, le=1, description="Target update coefficient (1: hard copy).")
    train_freq: PositiveInt = Field(4, description="Steps per environment between training phases.")
    gradient_steps: PositiveInt = Field(1, description="Gradient steps per training phase.")
    target_update_interval: PositiveInt = Field(10_000, description="Env steps between target updates.")
    double_q: bool = Field(False, description="Double DQN: the online network picks the next action.")
    n_step: PositiveInt = Field(1, le=100, description="Multi-step targets: sum n rewards, then bootstrap with "
                                "gamma^n (Rainbow uses 3); 1: one-step DQN.")
    loss: Literal["huber", "mse"] = Field("huber", description="Huber (smooth L1) or squared TD error.")
    net_arch: list[Width] = Field(default_factory=lambda: [64, 64], description="Hidden layer sizes.")
    activation: Literal["tanh", "relu"] = "relu"
    munchausen: float = Field(0.0, ge=0, le=1, description="Munchausen DQN's alpha, the weight of the scaled "
                              "log-policy added to the reward (Vieillard et al. 2020 use 0.9); 0: off.")
    entropy_tau: PositiveFloat = Field(0.03, description="Munchausen DQN's temperature tau of pi = "
                                       "softmax(Q / tau).")
    log_policy_clip: float = Field(-1.0, lt=0, description="Munchausen DQN's lower clip l0 of tau ln pi.")

    @model_validator(mode="after")
    def _one_target(self) -> DQNHParams:
        if self.munchausen and self.double_q:
            raise ValueError("munchausen and double_q are two different targets: set one of them")
        if self.munchausen and self.n_step > 1:
            raise ValueError("munchausen's target is a one-step target: use n_step 1 with it")
        return self


class QNetwork(torch.nn.Module):
    def __init__(self, observation_space: Any, n_actions: int, net_arch: list[int], activation: str,
                 encoder: ObservationEncoder | None = None):
        super().__init__()
        self.encoder = encoder or ObservationEncoder(observation_space)
        self.q = mlp([self.encoder.dim, *net_arch, n_actions], activation, orthogonal=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(self.encoder(obs))


def dqn_targets(q_target: Callable[[torch.Tensor], torch.Tensor], q_online: Callable[[torch.Tensor], torch.Tensor],
                batch: dict[str, torch.Tensor], gamma: float | torch.Tensor, double_q: bool) -> torch.Tensor:
    with torch.no_grad():
        next_q_all = q_target(batch["next_obs"])  # (B, A)
        if double_q:
            next_actions = q_online(batch["next_obs"]).argmax(dim=-1, keepdim=True)
        else:
            next_actions = next_q_all.argmax(dim=-1, keepdim=True)
        next_q = next_q_all.gather(-1, next_actions).squeeze(-1)
        return td_target(batch["rewards"], next_q, batch["terminated"], batch.get("discounts", gamma))


def munchausen_targets(q_target_obs: torch.Tensor, q_target_next: torch.Tensor, actions: torch.Tensor,
                       rewards: torch.Tensor, terminated: torch.Tensor, gamma: float | torch.Tensor, alpha: float,
                       tau: float, clip: float) -> torch.Tensor:
    """Munchausen DQN's target (Vieillard et al. 2020, eq. 2), from the target network's Q values at s and s'
    (shape (..., A)) and the actions taken (shape (...)):

        y = r + alpha * clip(tau ln pi(a|s), clip, 0) + gamma * sum_a' pi(a'|s') (Q(s', a') - tau ln pi(a'|s'))

    with pi = softmax(Q / tau). The sum is the soft value tau * logsumexp(Q(s') / tau), and tau ln pi(a|s) =
    Q(s, a) - tau * logsumexp(Q(s) / tau). A truncated transition is bootstrapped, as in `td_target`."""
    with torch.no_grad():
        soft_obs = tau * torch.logsumexp(q_target_obs / tau, dim=-1)
        log_pi = q_target_obs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1) - soft_obs
        soft_next = tau * torch.logsumexp(q_target_next / tau, dim=-1)
        return td_target(rewards + alpha * log_pi.clamp(clip, 0.0), soft_next, terminated, gamma)


def targets(hp: DQNHParams, q_target: Callable[[torch.Tensor], torch.Tensor],
            q_online: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, torch.Tensor],
            gamma: float | torch.Tensor) -> torch.Tensor:
    """The TD targets of a minibatch for the target the hyperparameters choose."""
    if hp.munchausen:
        with torch.no_grad():  # the target network's values only
            q_obs, q_next = q_target(torch.cat([batch["obs"], batch["next_obs"]], dim=-2)).chunk(2, dim=-2)
        return munchausen_targets(q_obs, q_next, batch["actions"], batch["rewards"], batch["terminated"], gamma,
                                  hp.munchausen, hp.entropy_tau, hp.log_policy_clip)
    return dqn_targets(q_target, q_online, batch, gamma, hp.double_q)


def dqn_minibatch_loss(q_net: Callable[[torch.Tensor], torch.Tensor], q_target: Callable[[torch.Tensor], torch.Tensor],
                       batch: dict[str, torch.Tensor], gamma: float | torch.Tensor, hp: DQNHParams
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """DQN's loss on one minibatch (Huber or squared TD error against `targets`) and the mean Q of the
    actions taken (without gradient). The one definition for one seed and for many: samples (B, ...) and a
    number gamma for one seed, (N, B, ...) and gamma (N, 1) for N seeds stacked."""
    y = targets(hp, q_target, q_net, batch, gamma)
    q = q_net(batch["obs"]).gather(-1, batch["actions"].long().unsqueeze(-1)).squeeze(-1)
    loss = F.smooth_l1_loss(q, y, reduction="none") if hp.loss == "huber" else F.mse_loss(q, y, reduction="none")
    return loss.mean(-1), q.detach().mean(-1)


class DQNTrainer(RLTrainer):
    hparams_model = DQNHParams
    hp: DQNHParams
    POLICY = "q_net"
    fast_update = True  # False: every update through autograd (the kernel's tests compare the two)

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        hp = self.hp
        n_actions = int(self.action_space.n)  # type: ignore[attr-defined]
        with seeded_torch(derive_seed(seed, "init")):
            self.q_net = QNetwork(self.observation_space, n_actions, hp.net_arch, hp.activation,
                                  encoder=self.encoder()).to(self.device)
        self.q_target = self.target_copy(self.q_net)
        self.optimizer = ScheduledOptimizer(self.q_net.parameters(), hp)
        self.behaviour = EpsilonGreedyNet(self.q_net, n_actions, self.device)
        space = self.observation_space
        self.buffer = ReplayBuffer(hp.buffer_size, space.shape or (), space.dtype, (), np.int64,
                                   derive_seed(seed, "replay"), n_step=hp.n_step, gamma=hp.gamma, n_envs=hp.n_envs)
        self.last_target_update = 0
        # The same loss's gradient in closed form, where the Q network is a plain MLP (rl/fastmlp.py)
        self.fast = FastDQNUpdate(self.q_net, self.q_target, targets) \
            if self.fast_update and FastDQNUpdate.why_not(self.q_net) is None else None

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        progress = self.env_steps / self.spec.budget.total
        # 1. collect
        learning = self.env_steps >= hp.learning_starts
        self.behaviour.epsilon = hp.epsilon_at(progress) if learning else 1.0
        rollout, logged = self.collect(self.behaviour, hp.n_envs, hp.train_freq)
        self.buffer.add_rollout(rollout)
        logged[M.DQN_EPSILON] = self.behaviour.epsilon

        # 2. gradient steps
        if self.env_steps >= hp.learning_starts:
            losses, q_values = [], []
            for _ in range(hp.gradient_steps):
                batch = self.buffer.sample(hp.batch_size, self.device)
                batch["rewards"] = self.scale_rewards(batch["rewards"])
                if self.fast is not None:
                    loss, q_mean = self.fast.gradients(batch, hp.gamma, hp)
                    self.optimizer.step_gradients(progress)
                else:
                    loss, q_mean = dqn_minibatch_loss(self.q_net, self.q_target, batch, hp.gamma, hp)
                    self.optimizer.step_tensor(loss, progress)
                losses.append(loss.detach())
                q_values.append(q_mean)
            # read back at once: one host sync a training phase, not two a gradient step
            loss_mean, q_mean_all = torch.stack([torch.stack(losses).mean(), torch.stack(q_values).mean()]).tolist()
            logged.update({M.LOSS_VALUE: loss_mean, M.Q_MEAN: q_mean_all,
                           M.LEARNING_RATE: self.optimizer.learning_rate})

        # 3. target network
        if self.env_steps - self.last_target_update >= hp.target_update_interval:
            polyak_update(self.q_net.parameters(), self.q_target.parameters(), hp.tau)
            self.last_target_update = self.env_steps
        self.iterations += 1
        return logged

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.behaviour.greedy(obs)

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q_net.state_dict(), "q_target": self.q_target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                "last_target_update": self.last_target_update, "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q_net.load_state_dict(state["q"])
        self.q_target.load_state_dict(state["q_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.last_target_update = int(state["last_target_update"])
        self.load_rl_state(state["rl"])


register(AlgorithmInfo(
    name="dqn", kind="rl", hparams=DQNHParams, trainer=DQNTrainer,
    summary="Deep Q-Network with replay, target network, epsilon schedule, optional Double DQN",
    action_spaces=("discrete",),
    mutable_hparams=("learning_rate", "max_grad_norm", "gradient_steps"),
    observation_spaces=("vector", "discrete", "image"),
    seed_group="labfleet.algorithms.rl.batched:BatchedDQN",
    per_seed_hparams=(
        "learning_rate", "lr_schedule", "max_grad_norm", "gamma", "tau", "target_update_interval",
        "exploration_initial_eps", "exploration_final_eps", "exploration_fraction"),
    group_hparams=(
        "optimizer", "normalize", "encoder", "encoder_kwargs", "net_arch", "activation", "n_envs", "buffer_size",
        "learning_starts", "batch_size", "train_freq", "gradient_steps", "double_q", "n_step", "loss", "munchausen",
        "entropy_tau", "log_policy_clip"),
))
