"""Evaluating perturbed policies for evolution strategies: a shared noise table, episodes of many
parameter vectors stepped together, and Ray actors that split that work.

Perturbation j of an iteration has parameters theta + sign_j * sigma * noise[offset_j : offset_j + dim]
and runs one episode on an environment reset with a seed the caller derives from (run seed, iteration,
pair): the + and - members of a pair share it (common random numbers). The perturbations are evaluated
in fixed chunks of `chunk` consecutive ones, and a worker always takes whole chunks, so how many workers
there are changes speed, not a single return.

The workers are `rollout.workers.PerturbationWorkerGroup`. The noise table is made once from the run seed
and travels to every worker once, through the object store (`ray.put` by the trainer; each worker maps the
same shared-memory copy). theta travels once per iteration the same way.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from labfleet.rollout.envs import EnvMaker
from labfleet.rollout.sampler import clip_to_space


def noise_table(seed: int, size: int) -> np.ndarray:
    """`size` standard normal float32 values from the seed alone (Salimans et al. 2017, section 2.1)."""
    return np.random.default_rng(seed).standard_normal(size, dtype=np.float32)


class PerturbationEvaluator:
    """Runs one episode per perturbed parameter vector, `chunk` of them stepped together in a vector env
    with the policies batched by `torch.func.vmap` over stacked parameters."""

    def __init__(self, maker: EnvMaker, policy: nn.Module, noise: np.ndarray, chunk: int,
                 max_episode_steps: int = 100_000):
        self.maker, self.chunk = maker, chunk
        self.policy = policy.cpu()
        self.noise = noise
        self.max_episode_steps = max_episode_steps
        self.shapes = {name: p.shape for name, p in self.policy.named_parameters()}
        self.envs: gym.vector.VectorEnv | None = None

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(K, dim) -> {name: (K, *shape)} in the order of `named_parameters`."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = flat[:, start:start + size].reshape(flat.shape[0], *shape)
            start += size
        return out

    def evaluate(self, theta: np.ndarray, offsets: np.ndarray, signs: np.ndarray, sigma: float,
                 seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(returns, lengths) of one episode for each perturbation j (signs in {+1, -1})."""
        returns, lengths = np.zeros(len(offsets)), np.zeros(len(offsets), dtype=np.int64)
        for start in range(0, len(offsets), self.chunk):
            part = slice(start, start + self.chunk)
            returns[part], lengths[part] = self._episodes(theta, offsets[part], signs[part], sigma, seeds[part])
        return returns, lengths

    def _episodes(self, theta: np.ndarray, offsets: np.ndarray, signs: np.ndarray, sigma: float,
                  seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        k, dim = len(offsets), len(theta)
        eps = np.stack([self.noise[o:o + dim] for o in offsets])  # (K, dim)
        params = self._unflatten(torch.as_tensor(theta[None] + sigma * signs[:, None] * eps, dtype=torch.float32))
        if self.envs is None or self.envs.num_envs != k:
            if self.envs is not None:
                self.envs.close()
            self.envs = self.maker.make_vector(k)
        act = vmap(lambda p, o: functional_call(self.policy, p, (o[None],))[0])
        obs, _ = self.envs.reset(seed=list(seeds))  # type: ignore[arg-type]
        total, steps = np.zeros(k), np.zeros(k, dtype=np.int64)
        active = np.ones(k, dtype=bool)
        with torch.inference_mode():
            for _ in range(self.max_episode_steps):
                actions = act(params, torch.as_tensor(obs)).numpy()
                obs, reward, term, trunc, _ = self.envs.step(clip_to_space(actions, self.envs.single_action_space))
                total += np.where(active, reward, 0.0)
                steps += active
                active &= ~(term | trunc)
                if not active.any():
                    break
        return total, steps

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
        self.envs = None
