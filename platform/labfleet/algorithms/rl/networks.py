"""Networks shared by the RL algorithms: MLPs, observation encoders (one-hot, flat vectors, the Nature-DQN
CNN for images), categorical and Gaussian policies.

Plumbing only: no loss is computed here. Policies sample from noise the caller supplies (uniforms in
(0, 1)), so where and in which batch an environment is stepped does not change its actions.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def layer_init(layer: nn.Linear | nn.Conv2d, gain: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights, constant bias (the PPO implementation-details recipe)."""
    nn.init.orthogonal_(layer.weight, gain)
    assert layer.bias is not None
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


def is_image_space(space: gym.Space) -> bool:
    """uint8 boxes of rank 2 (H, W) or 3 (C, H, W or H, W, C): frames, as SB3's `is_image_space` reads them."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)


class NatureCNN(nn.Module):
    """The convolutional torso of Mnih et al. (2015), as SB3 and CleanRL use it on Atari frames:
    conv 32x8x8/4, conv 64x4x4/2, conv 64x3x3/1 (ReLU each), then a 512-unit linear layer (ReLU)."""

    def __init__(self, channels: int, height: int, width: int, features: int = 512):
        super().__init__()
        self.convs = nn.Sequential(
            layer_init(nn.Conv2d(channels, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, channels, height, width)).shape[1]
        self.head = nn.Sequential(layer_init(nn.Linear(flat, features)), nn.ReLU())
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(images))


class ObservationEncoder(nn.Module):
    """Discrete(n) -> one-hot of length n; a Box -> its values as a flat float vector, or, for images (uint8
    frames, or any rank-2/3 box with kind "nature_cnn"), the 512 features of a `NatureCNN` on the frames
    scaled to [0, 1]. An `ObservationNormalizer`, when given, is applied to Box observations first (and
    replaces the scaling)."""

    def __init__(self, space: gym.Space, normalizer: nn.Module | None = None, kind: str = "auto",
                 kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.normalizer = normalizer
        self.n = 0
        self.cnn: NatureCNN | None = None
        self.custom: nn.Module | None = None  # `encoder: package.module:Class`, the user's own module
        if ":" in kind:
            self.shape = tuple(space.shape or ())
            self.custom = custom_encoder(kind)(space, **(kwargs or {}))
            dim = getattr(self.custom, "features_dim", None)
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise TypeError(f"{kind} must set `features_dim` (a positive int: how many features it returns), "
                                f"got {dim!r}")
            self.dim = dim
            return
        if isinstance(space, gym.spaces.Discrete):
            self.n = int(space.n)
            self.dim = self.n
            return
        self.shape = tuple(space.shape or ())
        if kind == "nature_cnn" or (kind == "auto" and is_image_space(space)):
            if len(self.shape) not in (2, 3):
                raise ValueError(f"nature_cnn needs image observations (rank 2 or 3), not shape {self.shape}")
            # Channels first unless the last axis is the small one (H, W, C): frame stacks are (K, H, W).
            self.channels_last = len(self.shape) == 3 and self.shape[-1] < self.shape[0]
            c, h, w = ((self.shape[2], self.shape[0], self.shape[1]) if self.channels_last else
                       (1, *self.shape) if len(self.shape) == 2 else self.shape)
            self.cnn = NatureCNN(c, h, w)
            self.scale = 1.0 / 255.0 if space.dtype == np.uint8 and normalizer is None else 1.0
            self.dim = self.cnn.features
        else:
            self.dim = int(np.prod(self.shape))

    @property
    def plain(self) -> bool:
        """Flat vectors in, the same vectors out: what the batched seed kernels cover."""
        return self.cnn is None and self.n == 0 and self.custom is None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.n:
            return nn.functional.one_hot(obs.long(), self.n).float()
        x = obs.float()
        if self.normalizer is not None:
            x = self.normalizer(x)
        rank = len(self.shape)
        lead = x.shape[:x.dim() - rank]
        if self.custom is not None:  # the user's module sees a batch of observations, one leading axis
            return self.custom(x.reshape(-1, *self.shape)).reshape(*lead, self.dim)
        if self.cnn is None:
            return x if rank == 1 else x.reshape(*lead, self.dim)
        images = x.reshape(-1, *self.shape) * self.scale
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)
        elif rank == 2:
            images = images.unsqueeze(1)
        return self.cnn(images).reshape(*lead, self.dim)


def custom_encoder(path: str, spec_dir: str | None = None) -> type[nn.Module]:
    """The user's encoder class named "package.module:Class" (imported, never called here); ImportError or
    TypeError saying what is wrong."""
    from labfleet.usercode import import_path

    cls = import_path(path, spec_dir)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{path} must name a torch.nn.Module subclass (built as Class(observation_space, "
                        f"**encoder_kwargs)), not {cls!r}")
    return cls


def categorical_terms(logits: torch.Tensor, actions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A categorical policy's (log pi(a|s), H[pi(.|s)], its log-probabilities (..., A) for `policy_kl`) from
    its logits (..., A): one seed's or N seeds' stacked."""
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1), (logp_all,)


def gaussian_terms(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A diagonal Gaussian policy's (log pi(a|s), H[pi(.|s)], (mean, log_std) for `policy_kl`), in closed
    form, from its means (..., A) and a log_std that broadcasts to them."""
    log_std = log_std.expand_as(mean)
    z = (actions - mean) / log_std.exp()
    logp = (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)
    return logp, entropy, (mean, log_std)


class CategoricalPolicy(nn.Module):
    """pi(a|s) = softmax(logits(s)); sampling by Gumbel-max on caller-supplied uniforms."""

    def __init__(self, observation_space: gym.Space, n_actions: int, net_arch: list[int], activation: str,
                 encoder: ObservationEncoder | None = None):
        super().__init__()
        self.encoder = encoder or ObservationEncoder(observation_space)
        self.logits = mlp([self.encoder.dim, *net_arch, n_actions], activation, out_gain=0.01)
        self.noise_dim = n_actions

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.logits(self.encoder(obs)))

    def log_prob_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(a|s), H[pi(.|s)]) without building a Distribution (the hot path of every update)."""
        logp, entropy, _ = self.evaluate(self.encoder(obs), actions)
        return logp, entropy

    def evaluate(self, x: torch.Tensor, actions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """From encoded observations: (log pi(a|s), H[pi(.|s)], the distribution's parameters for
        `policy_kl`: its log-probabilities (..., A))."""
        return categorical_terms(self.logits(x), actions)

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
                 log_std_init: float = 0.0, encoder: ObservationEncoder | None = None):
        super().__init__()
        self.encoder = encoder or ObservationEncoder(observation_space)
        self.mean = mlp([self.encoder.dim, *net_arch, action_dim], activation, out_gain=0.01)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))
        self.noise_dim = action_dim

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Independent:
        mean = self.mean(self.encoder(obs))
        return torch.distributions.Independent(torch.distributions.Normal(mean, self.log_std.exp()), 1)

    def log_prob_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(a|s), H[pi(.|s)]) of the diagonal Gaussian, in closed form."""
        logp, entropy, _ = self.evaluate(self.encoder(obs), actions)
        return logp, entropy

    def evaluate(self, x: torch.Tensor, actions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """From encoded observations: (log pi(a|s), H[pi(.|s)], the distribution's parameters for
        `policy_kl`: (mean, log_std), each (..., A))."""
        return gaussian_terms(self.mean(x), self.log_std, actions)

    @staticmethod
    def transform_noise(uniforms: np.ndarray) -> np.ndarray:
        """Standard normal noise by the inverse CDF."""
        return torch.special.ndtri(torch.as_tensor(np.clip(uniforms, 1e-12, 1 - 1e-12))).numpy().astype(np.float32)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.mean(self.encoder(obs)) + self.log_std.exp() * noise

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean(self.encoder(obs))


def make_policy(observation_space: gym.Space, action_space: gym.Space, net_arch: list[int],
                activation: str, encoder: ObservationEncoder | None = None) -> CategoricalPolicy | GaussianPolicy:
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalPolicy(observation_space, int(action_space.n), net_arch, activation, encoder=encoder)
    return GaussianPolicy(observation_space, int(np.prod(action_space.shape or ())), net_arch, activation,
                          encoder=encoder)


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


def standardised(values: torch.Tensor) -> torch.Tensor:
    """(x - mean) / (std + 1e-8) along the last axis (each seed's own, when seeds are stacked before it);
    unchanged where it holds one value, whose std is undefined."""
    if values.shape[-1] < 2:
        return values
    return (values - values.mean(-1, keepdim=True)) / (values.std(-1, keepdim=True) + 1e-8)


def per_sample(coefficient: float | torch.Tensor) -> float | torch.Tensor:
    """A coefficient (a number, or one per seed (N,)) shaped to meet samples (N, B)."""
    return coefficient.unsqueeze(-1) if isinstance(coefficient, torch.Tensor) else coefficient


def policy_kl(old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """KL[old || new] per state, in closed form, from the distribution parameters `evaluate` gives: of two
    categoricals (their log-probabilities) or two diagonal Gaussians ((mean, log_std), summed over the
    action's axes), as `torch.distributions.kl_divergence` computes them."""
    if len(old) == 1:
        return (old[0].exp() * (old[0] - new[0])).sum(-1)
    (mean_old, log_std_old), (mean, log_std) = old, new
    var_ratio = (2 * (log_std_old - log_std)).exp()
    t1 = ((mean_old - mean) / log_std.exp()).pow(2)
    return (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum(-1)


class PolicyValue(NamedTuple):
    """What one call of an `ActorCritic` gives for (observations, actions taken)."""

    logp: torch.Tensor  # log pi(a|s)
    entropy: torch.Tensor  # H[pi(.|s)]
    value: torch.Tensor  # V(s)
    dist: tuple[torch.Tensor, ...]  # the distribution's parameters, for `policy_kl`


class ActorCritic(nn.Module):
    """Separate policy and state-value MLPs (no shared trunk: one of PPO's implementation details) on the
    policy's observation encoder; for images that encoder is a CNN the two heads share (as in the Atari
    setups of Mnih et al. 2016, CleanRL and SB3's CnnPolicy)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, net_arch: list[int], activation: str,
                 encoder: ObservationEncoder | None = None):
        super().__init__()
        self.policy = make_policy(observation_space, action_space, net_arch, activation, encoder=encoder)
        self.value_net = mlp([self.policy.encoder.dim, *net_arch, 1], activation, out_gain=1.0)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> PolicyValue:
        """The policy's and the value's outputs on one encoding of the observations: what the losses call
        (a batched group's `_evaluate` gives the same for stacked seeds)."""
        x = self.policy.encoder(obs)
        logp, entropy, dist = self.policy.evaluate(x, actions)
        return PolicyValue(logp, entropy, self.value_net(x).squeeze(-1), dist)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_net(self.policy.encoder(obs)).squeeze(-1)
