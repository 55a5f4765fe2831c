"""DDPG (Lillicrap et al. 2016): deterministic actor, Q critic, target networks, replay, action noise.

One iteration:
  1. collect   train_freq steps from each of n_envs environments with a = clip(mu(s) + noise) (Gaussian
               or Ornstein-Uhlenbeck noise; uniformly random actions until learning_starts); store
               (s, a, r, s', terminated) in the replay buffer
  2. for each of gradient_steps minibatches (once learning_starts steps are collected):
       critic  y = r + gamma * Q_targ(s', mu_targ(s')) * (1 - terminated);  L_Q = mean((Q(s, a) - y)^2)
       actor   L_mu = -mean(Q(s, mu(s)))
       targets theta_targ <- tau * theta + (1 - tau) * theta_targ   (Polyak averaging, both networks)
  3. log
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt

from labfleet import metrics as M
from labfleet.algorithms.optim import OptimHParams, OptimizerConfig, ScheduledOptimizer
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import RLTrainer, seeded_torch
from labfleet.algorithms.rl.estimators import polyak_update, td_target
from labfleet.algorithms.rl.networks import ObservationEncoder, mlp
from labfleet.algorithms.rl.normalize import ObservationHParams
from labfleet.algorithms.sizes import BatchSize, BufferSize, EnvCount, Width
from labfleet.rollout.envs import derive_seed
from labfleet.rollout.replay import ReplayBuffer
from labfleet.spec.models import ExperimentSpec


class DDPGHParams(OptimHParams, ObservationHParams):
    learning_rate: float | str = Field(1e-3, description='Learning rate of actor and critic, or "lin_<value>".')
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    max_grad_norm: PositiveFloat | None = Field(None, description="Clip the global gradient norm; null: off.")
    n_envs: EnvCount = Field(1, description="Environments stepped together.")
    buffer_size: BufferSize = Field(1_000_000, description="Replay buffer capacity (transitions).")
    learning_starts: int = Field(100, ge=0, description="Env steps of random actions before learning.")
    batch_size: BatchSize = Field(256, description="Minibatch size.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    tau: float = Field(0.005, gt=0, le=1, description="Polyak coefficient of the target networks.")
    train_freq: PositiveInt = Field(1, description="Steps per environment between training phases.")
    gradient_steps: PositiveInt = Field(1, description="Gradient steps per training phase.")
    noise_type: Literal["normal", "ornstein_uhlenbeck", "none"] = Field("normal", description="Exploration noise.")
    noise_std: float = Field(0.1, ge=0, description="Noise scale, as a fraction of the action range's half-width.")
    ou_theta: float = Field(0.15, gt=0, description="Ornstein-Uhlenbeck mean reversion.")
    ou_dt: float = Field(1e-2, gt=0, description="Ornstein-Uhlenbeck time step.")
    net_arch: list[Width] = Field(default_factory=lambda: [400, 300], description="Hidden sizes, each net.")
    activation: Literal["tanh", "relu"] = "relu"


class Actor(torch.nn.Module):
    """mu(s) in the action box: tanh output rescaled to [low, high]."""

    def __init__(self, observation_space: gym.Space, action_space: gym.spaces.Box, net_arch: list[int],
                 activation: str, encoder: ObservationEncoder | None = None):
        super().__init__()
        self.encoder = encoder or ObservationEncoder(observation_space)
        dim = int(np.prod(action_space.shape or ()))
        self.mu = mlp([self.encoder.dim, *net_arch, dim], activation, orthogonal=False)
        self.low: torch.Tensor
        self.high: torch.Tensor
        self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        squashed = torch.tanh(self.mu(self.encoder(obs)))
        return self.low + (squashed + 1.0) * 0.5 * (self.high - self.low)


class Critic(torch.nn.Module):
    """Q(s, a) on the concatenation of the encoded observation and the action."""

    def __init__(self, observation_space: gym.Space, action_dim: int, net_arch: list[int], activation: str,
                 encoder: ObservationEncoder | None = None):
        super().__init__()
        self.encoder = encoder or ObservationEncoder(observation_space)
        self.q = mlp([self.encoder.dim + action_dim, *net_arch, 1], activation, orthogonal=False)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q(torch.cat([self.encoder(obs), action], dim=-1)).squeeze(-1)


class NoisyActor:
    """The behaviour policy: uniform random actions while `random` is set, else mu(s) plus noise, clipped.
    Ornstein-Uhlenbeck noise keeps one state per environment (in the process that steps it)."""

    def __init__(self, actor: Actor, space: gym.spaces.Box, hp: DDPGHParams, device: torch.device):
        self.actor, self.hp, self.device = actor, hp, device
        self.low, self.high = space.low.astype(np.float32), space.high.astype(np.float32)
        self.noise_dim = int(np.prod(space.shape or ()))
        self.random = True
        self.ou_state: np.ndarray | None = None

    @staticmethod
    def transform_noise(uniforms: np.ndarray) -> np.ndarray:
        return uniforms  # uniform actions before learning_starts; normal noise is made in `noise`

    def __call__(self, obs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        if self.random:
            return (self.low + uniforms * (self.high - self.low)).astype(np.float32)
        with torch.no_grad():
            mu = self.actor(torch.as_tensor(obs, device=self.device)).cpu().numpy()
        return np.clip(mu + self.noise(uniforms) * 0.5 * (self.high - self.low), self.low, self.high)

    def noise(self, uniforms: np.ndarray) -> np.ndarray:
        hp = self.hp
        gaussian = torch.special.ndtri(torch.as_tensor(uniforms).clamp(1e-12, 1 - 1e-12)).numpy()
        if hp.noise_type == "none":
            return np.zeros_like(gaussian)
        if hp.noise_type == "normal":
            return hp.noise_std * gaussian
        if self.ou_state is None or self.ou_state.shape != gaussian.shape:
            self.ou_state = np.zeros_like(gaussian)
        self.ou_state = (self.ou_state - hp.ou_theta * self.ou_state * hp.ou_dt
                         + hp.noise_std * np.sqrt(hp.ou_dt) * gaussian)
        return self.ou_state

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.actor(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    # the rollout-worker protocol
    def get_state(self) -> dict[str, Any]:
        return {"actor": {k: v.detach().cpu() for k, v in self.actor.state_dict().items()}, "random": self.random}

    def set_state(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.random = state["random"]

    def to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.actor.to(self.device)


ActorFn = Callable[[torch.Tensor], torch.Tensor]
CriticFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddpg_critic_loss(critic: CriticFn, actor_target: ActorFn, critic_target: CriticFn, batch: dict[str, torch.Tensor],
                     gamma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's loss on one minibatch, mean((Q(s, a) - y)^2) with y = r + gamma Q'(s', mu'(s')) (not past a
    terminal state), and the mean of Q(s, a) (without gradient). The one definition for one seed and for many:
    samples (B, ...) and a number gamma for one seed, (N, B, ...) and gamma (N, 1) for N seeds stacked."""
    with torch.no_grad():
        next_q = critic_target(batch["next_obs"], actor_target(batch["next_obs"]))
        y = td_target(batch["rewards"], next_q, batch["terminated"], gamma)
    q = critic(batch["obs"], batch["actions"])
    return ((q - y) ** 2).mean(-1), q.detach().mean(-1)


def ddpg_actor_loss(actor: ActorFn, critic: CriticFn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The actor's loss on one minibatch: -mean(Q(s, mu(s)))."""
    return -critic(batch["obs"], actor(batch["obs"])).mean(-1)


class DDPGTrainer(RLTrainer):
    hparams_model = DDPGHParams
    hp: DDPGHParams
    POLICY = "actor"

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        hp = self.hp
        space = self.action_space
        assert isinstance(space, gym.spaces.Box)
        with seeded_torch(derive_seed(seed, "init")):
            self.actor = Actor(self.observation_space, space, hp.net_arch, hp.activation,
                               encoder=self.encoder()).to(self.device)
            self.critic = Critic(self.observation_space, int(np.prod(space.shape or ())), hp.net_arch,
                                 hp.activation, encoder=self.encoder()).to(self.device)
        self.actor_target, self.critic_target = self.target_copy(self.actor), self.target_copy(self.critic)
        self.actor_optimizer = ScheduledOptimizer(self.actor.parameters(), hp)
        self.critic_optimizer = ScheduledOptimizer(self.critic.parameters(), hp)
        self.behaviour = NoisyActor(self.actor, space, hp, self.device)
        obs_space = self.observation_space
        self.buffer = ReplayBuffer(hp.buffer_size, obs_space.shape or (), obs_space.dtype, space.shape or (),
                                   np.float32, derive_seed(seed, "replay"), n_envs=hp.n_envs)

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        progress = self.env_steps / self.spec.budget.total
        # 1. collect
        self.behaviour.random = self.env_steps < hp.learning_starts
        rollout, logged = self.collect(self.behaviour, hp.n_envs, hp.train_freq)
        self.buffer.add_rollout(rollout)
        if self.env_steps < hp.learning_starts:
            self.iterations += 1
            return logged

        # 2. gradient steps
        critic_losses, actor_losses, q_means = [], [], []
        for _ in range(hp.gradient_steps):
            batch = self.buffer.sample(hp.batch_size, self.device)
            batch["rewards"] = self.scale_rewards(batch["rewards"])
            critic_loss, q_mean = ddpg_critic_loss(self.critic, self.actor_target, self.critic_target, batch, hp.gamma)
            self.critic_optimizer.step(critic_loss, progress)
            actor_loss = ddpg_actor_loss(self.actor, self.critic, batch)
            self.actor_optimizer.step(actor_loss, progress)
            polyak_update(self.actor.parameters(), self.actor_target.parameters(), hp.tau)
            polyak_update(self.critic.parameters(), self.critic_target.parameters(), hp.tau)
            critic_losses.append(critic_loss.item())
            actor_losses.append(actor_loss.item())
            q_means.append(q_mean.item())
        self.iterations += 1

        # 3. log
        logged.update({M.LOSS_VALUE: float(np.mean(critic_losses)), M.LOSS_POLICY: float(np.mean(actor_losses)),
                       M.DDPG_Q_MEAN: float(np.mean(q_means)), M.LEARNING_RATE: self.actor_optimizer.learning_rate})
        return logged

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.behaviour.greedy(obs)

    def state_dict(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "buffer": self.buffer.state_dict(), "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optimizer", "critic_optimizer",
                     "buffer"):
            getattr(self, name).load_state_dict(state[name])
        self.behaviour.ou_state = None  # environments restart after a restore; so does their noise
        self.load_rl_state(state["rl"])


register(AlgorithmInfo(
    name="ddpg", kind="rl", hparams=DDPGHParams, trainer=DDPGTrainer,
    summary="Deep Deterministic Policy Gradient with target networks, replay and action noise",
    action_spaces=("continuous",),
    seed_group="labfleet.algorithms.rl.batched:BatchedDDPG",
    per_seed_hparams=(
        "learning_rate", "lr_schedule", "max_grad_norm", "gamma", "tau", "noise_std"),
    group_hparams=(
        "optimizer", "normalize", "encoder", "encoder_kwargs", "net_arch", "activation", "n_envs", "buffer_size",
        "learning_starts", "batch_size", "train_freq", "gradient_steps", "noise_type", "ou_theta", "ou_dt"),
))
