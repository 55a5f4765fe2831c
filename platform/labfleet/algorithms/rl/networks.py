"""Networks shared by the RL algorithms: MLPs, observation encoding, categorical and Gaussian policies.

Plumbing only: no loss is computed here. Policies sample from noise the caller supplies (uniforms in
(0, 1)), so where and in which batch an environment is stepped does not change its actions.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def layer_init(layer: nn.Linear, gain: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights, constant bias (the PPO implementation-details recipe)."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(sizes: list[int], activation: str, out_gain: float = 1.0, orthogonal: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        if orthogonal:
            layer_init(linear, out_gain if last else math.sqrt(2))
        layers.append(linear)
        if not last:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ObservationEncoder(nn.Module):
    """Box(d,) -> float vector as is; Discrete(n) -> one-hot of length n."""

    def __init__(self, space: gym.Space):
        super().__init__()
        if isinstance(space, gym.spaces.Discrete):
            self.n = int(space.n)
            self.dim = self.n
        else:
            self.n = 0
            self.dim = int(np.prod(space.shape or ()))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.n:
            return nn.functional.one_hot(obs.long(), self.n).float()
        return obs.float()


class CategoricalPolicy(nn.Module):
    """pi(a|s) = softmax(logits(s)); sampling by Gumbel-max on caller-supplied uniforms."""

    def __init__(self, observation_space: gym.Space, n_actions: int, net_arch: list[int], activation: str):
        super().__init__()
        self.encoder = ObservationEncoder(observation_space)
        self.logits = mlp([self.encoder.dim, *net_arch, n_actions], activation, out_gain=0.01)
        self.noise_dim = n_actions

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.logits(self.encoder(obs)))

    def log_prob_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(a|s), H[pi(.|s)]) without building a Distribution (the hot path of every update)."""
        logp_all = torch.log_softmax(self.logits(self.encoder(obs)), dim=-1)
        logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return logp, -(logp_all.exp() * logp_all).sum(-1)

    @staticmethod
    def transform_noise(uniforms: np.ndarray) -> np.ndarray:
        """Gumbel(0, 1) noise: argmax(logits + g) is a sample of softmax(logits) (the Gumbel-max trick)."""
        return -np.log(-np.log(np.clip(uniforms, 1e-12, 1 - 1e-12))).astype(np.float32)

    def sample(self, obs: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
        return torch.argmax(self.logits(self.encoder(obs)) + gumbel, dim=-1)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.argmax(self.logits(self.encoder(obs)), dim=-1)


class GaussianPolicy(nn.Module):
    """pi(a|s) = N(mu(s), diag(exp(log_std))^2) with a state-independent log_std."""

    def __init__(self, observation_space: gym.Space, action_dim: int, net_arch: list[int], activation: str,
                 log_std_init: float = 0.0):
        super().__init__()
        self.encoder = ObservationEncoder(observation_space)
        self.mean = mlp([self.encoder.dim, *net_arch, action_dim], activation, out_gain=0.01)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))
        self.noise_dim = action_dim

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Independent:
        mean = self.mean(self.encoder(obs))
        return torch.distributions.Independent(torch.distributions.Normal(mean, self.log_std.exp()), 1)

    def log_prob_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(a|s), H[pi(.|s)]) of the diagonal Gaussian, in closed form."""
        mean = self.mean(self.encoder(obs))
        log_std = self.log_std.expand_as(mean)
        z = (actions - mean) / log_std.exp()
        logp = (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)
        return logp, entropy

    @staticmethod
    def transform_noise(uniforms: np.ndarray) -> np.ndarray:
        """Standard normal noise by the inverse CDF."""
        return torch.special.ndtri(torch.as_tensor(np.clip(uniforms, 1e-12, 1 - 1e-12))).numpy().astype(np.float32)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.mean(self.encoder(obs)) + self.log_std.exp() * noise

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean(self.encoder(obs))


def make_policy(observation_space: gym.Space, action_space: gym.Space, net_arch: list[int],
                activation: str) -> CategoricalPolicy | GaussianPolicy:
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalPolicy(observation_space, int(action_space.n), net_arch, activation)
    return GaussianPolicy(observation_space, int(np.prod(action_space.shape or ())), net_arch, activation)


class NumpyPolicy:
    """Adapts a torch policy to the sampler's numpy interface (`noise_dim`, `__call__(obs, uniforms)`)."""

    def __init__(self, policy: CategoricalPolicy | GaussianPolicy, device: torch.device):
        self.policy = policy
        self.device = device
        self.noise_dim = policy.noise_dim

    def transform_noise(self, uniforms: np.ndarray) -> np.ndarray:
        return self.policy.transform_noise(uniforms)

    def __call__(self, obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            actions = self.policy.sample(torch.as_tensor(obs, device=self.device),
                                         torch.as_tensor(noise, device=self.device))
            return actions.cpu().numpy()

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.policy.greedy(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    # the rollout-worker protocol
    def get_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.policy.load_state_dict(state)

    def to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.policy.to(self.device)


class ActorCritic(nn.Module):
    """Separate policy and state-value MLPs (no shared trunk: one of PPO's implementation details)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, net_arch: list[int], activation: str):
        super().__init__()
        self.policy = make_policy(observation_space, action_space, net_arch, activation)
        self.value_net = mlp([self.policy.encoder.dim, *net_arch, 1], activation, out_gain=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_net(self.policy.encoder(obs)).squeeze(-1)
