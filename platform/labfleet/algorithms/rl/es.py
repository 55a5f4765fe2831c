"""Evolution strategies (Salimans, Ho, Chen, Sidor and Sutskever 2017): a gradient-free policy search that
estimates the gradient of the expected return from returns of randomly perturbed parameters.

One iteration, with theta the policy's parameters flattened and sigma the noise scale:
  1. sample    n = population_size / 2 offsets into the shared noise table: eps_i = noise[o_i : o_i + dim]
  2. evaluate  F+_i = return(theta + sigma eps_i), F-_i = return(theta - sigma eps_i)     (antithetic pairs,
               one episode each, the pair on the same environment seed), on `rollout_workers` Ray actors
  3. shape     ranks of all 2n returns mapped to [-0.5, 0.5] (centred ranks: invariant to the returns' scale,
               robust to outliers; the paper's section 2.2)
  4. estimate  g = 1 / (2 n sigma) sum_i (u+_i - u-_i) eps_i   with u the shaped fitness
  5. step      Adam ascent on g, with weight decay: theta <- Adam(-g + weight_decay theta)
  6. log
The policy is deterministic (the noise on the parameters is the exploration): argmax of logits for
discrete actions, tanh scaled to the bounds for continuous ones. The budget counts the environment steps
of every perturbed episode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from labfleet import metrics as M
from labfleet.algorithms.optim import OptimizerConfig, build_optimizer
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import RLTrainer, seeded_torch
from labfleet.algorithms.rl.networks import ObservationEncoder, mlp
from labfleet.algorithms.sizes import Width
from labfleet.rollout.envs import derive_seed
from labfleet.rollout.perturbations import PerturbationEvaluator, noise_table
from labfleet.seeding import rng_state, set_rng_state
from labfleet.spec.models import ExperimentSpec

if TYPE_CHECKING:
    from labfleet.rollout.workers import PerturbationWorkerGroup


class ESHParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    population_size: PositiveInt = Field(64, description="Perturbed policies per iteration (pairs: an even number).")
    noise_std: PositiveFloat = Field(0.05, description="sigma: the parameters' perturbation scale.")
    learning_rate: PositiveFloat = Field(0.02, description="Adam's step size on the estimated gradient.")
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(type="adam"),
                                       description="The optimiser that steps along the estimate.")
    weight_decay: float = Field(0.005, ge=0, description="L2 coefficient added to the ascent direction (the "
                                "paper's l2coeff).")
    noise_table_size: PositiveInt = Field(5_000_000, le=250_000_000, description="Standard normals shared by "
                                          "every worker (the paper: 250M).")
    chunk: PositiveInt = Field(32, le=4096, description="Perturbations stepped together in one vector env.")
    net_arch: list[Width] = Field(default_factory=lambda: [32, 32], description="Hidden layer sizes.")
    activation: Literal["tanh", "relu"] = "tanh"

    @field_validator("population_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"population_size counts antithetic pairs twice: use an even number, not {value}")
        return value


def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of x (ties in order of appearance) scaled to [-0.5, 0.5]: 0 -> -0.5, len - 1 -> 0.5."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return ranks / max(len(x) - 1, 1) - 0.5


def antithetic_gradient(shaped_pos: np.ndarray, shaped_neg: np.ndarray, eps: np.ndarray,
                        sigma: float) -> np.ndarray:
    """1 / (2 n sigma) sum_i (u+_i - u-_i) eps_i: eps (n, dim), u (n,)."""
    return (shaped_pos - shaped_neg) @ eps / (2 * len(shaped_pos) * sigma)


class ESPolicy(nn.Module):
    """obs -> action, deterministic: argmax of logits, or tanh scaled into the Box bounds."""

    low: torch.Tensor  # buffers of a Box action space
    high: torch.Tensor

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, net_arch: list[int], activation: str):
        super().__init__()
        self.encoder = ObservationEncoder(observation_space)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        out = int(action_space.n) if self.discrete else int(np.prod(action_space.shape or ()))  # type: ignore[attr-defined]
        self.net = mlp([self.encoder.dim, *net_arch, out], activation, out_gain=0.1)
        if not self.discrete:
            assert isinstance(action_space, gym.spaces.Box)
            self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        y = self.net(self.encoder(obs))
        if self.discrete:
            return torch.argmax(y, dim=-1)
        return self.low + (torch.tanh(y) + 1) * 0.5 * (self.high - self.low)


class ESTrainer(RLTrainer):
    hparams_model = ESHParams
    hp: ESHParams

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, "cpu")  # episodes step on CPUs; the update is a vector sum
        hp = self.hp
        with seeded_torch(derive_seed(seed, "init")):
            self.policy = ESPolicy(self.observation_space, self.action_space, hp.net_arch, hp.activation)
        self.theta = nn.Parameter(parameters_to_vector(self.policy.parameters()).detach().clone())
        self.optimizer = build_optimizer([self.theta], hp.optimizer, hp.learning_rate)
        self.rng = np.random.default_rng(derive_seed(seed, "offsets"))
        self._noise: np.ndarray | None = None
        self._evaluator: PerturbationEvaluator | PerturbationWorkerGroup | None = None

    @property
    def noise(self) -> np.ndarray:
        if self._noise is None:
            self._noise = noise_table(derive_seed(self.seed, "noise"), self.hp.noise_table_size)
        return self._noise

    def evaluator(self) -> PerturbationEvaluator | PerturbationWorkerGroup:
        if self._evaluator is None:
            workers = self.spec.resources.rollout_workers
            if workers:
                from labfleet.rollout.workers import PerturbationWorkerGroup  # Ray, only where workers are asked for

                self._evaluator = PerturbationWorkerGroup(self.env_maker, self.policy, self.noise,
                                                          self.hp.chunk, workers,
                                                          self.spec.resources.cpus_per_worker)
            else:
                self._evaluator = PerturbationEvaluator(self.env_maker, self.policy, self.noise,
                                                        self.hp.chunk)
        return self._evaluator

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        n, dim, sigma = hp.population_size // 2, self.theta.numel(), hp.noise_std
        theta = self.theta.detach().numpy().copy()

        # 1. sample: pair i is perturbations 2i (+) and 2i + 1 (-)
        offsets = self.rng.integers(0, len(self.noise) - dim + 1, size=n)
        seeds = [derive_seed(self.seed, "es", self.iterations, i) for i in range(n)]
        # 2. evaluate
        returns, lengths = self.evaluator().evaluate(theta, np.repeat(offsets, 2), np.tile([1.0, -1.0], n), sigma,
                                                     [s for s in seeds for _ in (0, 1)])
        self.env_steps += int(lengths.sum())
        pos, neg = returns[0::2], returns[1::2]
        # 3. shape, 4. estimate
        shaped = centered_ranks(returns)
        eps = np.stack([self.noise[o:o + dim] for o in offsets])  # (n, dim)
        g = antithetic_gradient(shaped[0::2], shaped[1::2], eps, sigma)
        # 5. step (ascent: the optimiser minimises)
        self.theta.grad = torch.as_tensor(-g, dtype=torch.float32) + hp.weight_decay * self.theta.detach()
        self.optimizer.step()
        self.iterations += 1

        # 6. log
        logged: dict[str, float] = {
            M.ENV_STEPS: float(self.env_steps), M.TRAIN_EPISODE_RETURN: float(returns.mean()),
            M.TRAIN_EPISODE_LENGTH: float(lengths.mean()), M.ES_RETURN_MAX: float(returns.max()),
            M.ES_GRAD_NORM: float(np.linalg.norm(g)), M.ES_THETA_NORM: float(self.theta.detach().norm()),
            M.ES_PAIR_AGREEMENT: float(np.mean(np.sign(pos - neg) == 0)),
            M.SPS: self._sps(),
        }
        return logged

    def _sps(self) -> float:
        import time

        return (self.env_steps - self._steps_at_start) / max(time.perf_counter() - self._started, 1e-9)

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        vector_to_parameters(self.theta.detach(), self.policy.parameters())
        with torch.inference_mode():
            return self.policy(torch.as_tensor(obs)).numpy()

    def close(self) -> None:
        if self._evaluator is not None:
            self._evaluator.close()
        self._evaluator = None

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(self.rng), "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self.rng, state["rng"])
        self.load_rl_state(state["rl"])


register(AlgorithmInfo(
    name="es", kind="rl", hparams=ESHParams, trainer=ESTrainer,
    summary="Evolution strategies: antithetic perturbations, centred ranks, Adam, a shared noise table",
))
