"""Seeded vectorised sampling: whole rollouts per call, and deterministic-policy evaluation.

Randomness is per environment index: environment `i` of a trial is reset with a seed derived from
(run seed, i) and its action noise comes from a generator derived from (run seed, i). A policy turns
that noise (uniforms in (0, 1)) into actions, e.g. Gumbel-max for categorical policies, so the same
environment sees the same actions whether it is stepped in the trial's process or in a Ray actor with
other environments (only floating-point rounding of a different batch size can differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from labfleet.rollout import envstate
from labfleet.rollout.envs import EnvMaker, derive_seed
from labfleet.seeding import rng_state, set_rng_state


def clip_to_space(actions: np.ndarray, space: gym.Space) -> np.ndarray:
    """Continuous actions are stepped clipped to the action bounds (and stored unclipped)."""
    if isinstance(space, gym.spaces.Box):
        return np.clip(actions, space.low, space.high)
    return actions


class NoisePolicy(Protocol):
    """What a sampler needs from a policy (a plain callable on numpy arrays, for any process)."""

    noise_dim: int

    def transform_noise(self, uniforms: np.ndarray, /) -> np.ndarray:
        """Uniforms in (0, 1) of any shape (..., noise_dim) -> the noise `__call__` takes (elementwise, so
        a whole rollout's noise is transformed at once)."""
        ...

    def __call__(self, obs: np.ndarray, noise: np.ndarray, /) -> np.ndarray:
        """obs (N, *obs_shape), noise (N, noise_dim) from `transform_noise` -> actions (N, *act_shape)."""
        ...


@dataclass
class Rollout:
    """n_steps transitions from each of n_envs environments, time-major."""

    obs: np.ndarray  # (T, N, *obs_shape)
    actions: np.ndarray  # (T, N, *act_shape): as sampled, before clipping to the action space
    rewards: np.ndarray  # (T, N) float32
    terminated: np.ndarray  # (T, N) bool: the episode ended in a terminal state (no bootstrap)
    truncated: np.ndarray  # (T, N) bool: the episode was cut by a time limit (bootstrap from next_obs)
    next_obs: np.ndarray  # (T, N, *obs_shape): true next observation, the final one where an episode ended
    episode_returns: list[float] = field(default_factory=list)  # episodes that ended in this rollout
    episode_lengths: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return int(self.rewards.size)

    @staticmethod
    def concatenate(parts: list[Rollout]) -> Rollout:
        """Join rollouts of disjoint environment ranges along the environment axis (in env order)."""
        if len(parts) == 1:
            return parts[0]
        cat = {name: np.concatenate([getattr(p, name) for p in parts], axis=1)
               for name in ("obs", "actions", "rewards", "terminated", "truncated", "next_obs")}
        return Rollout(**cat, episode_returns=[r for p in parts for r in p.episode_returns],
                       episode_lengths=[n for p in parts for n in p.episode_lengths])


@dataclass
class PartialRollout:
    """A rollout being collected step by step (`VectorSampler.begin` / `step`), then `finish()`ed."""

    noise: np.ndarray  # (T, N, k): the policy's noise for each step
    obs: np.ndarray
    next_obs: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    actions: np.ndarray | None = None
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)

    def finish(self) -> Rollout:
        assert self.actions is not None, "no step was taken"
        return Rollout(self.obs, self.actions, self.rewards, self.terminated, self.truncated, self.next_obs,
                       self.episode_returns, self.episode_lengths)


class VectorSampler:
    """Steps environments `first_env .. first_env + n_envs - 1` of a trial with a policy.

    `get_state()` is everything a restored sampler needs to go on exactly (each environment's state, the
    current observations, the episodes' running returns, the action-noise generators), or None when an
    environment cannot be saved (see `envstate`); `state=` restores it."""

    def __init__(self, maker: EnvMaker, n_envs: int, seed: int, first_env: int = 0, generation: int = 0,
                 state: dict[str, Any] | None = None):
        # `generation` separates the streams of a trainer restored without environment state from the original's.
        self.envs = maker.make_vector(n_envs)
        indices = range(first_env, first_env + n_envs)
        self.action_rngs = [np.random.default_rng(derive_seed(seed, i, "actions", generation)) for i in indices]
        self.obs, _ = self.envs.reset(seed=[derive_seed(seed, i, "env", generation) for i in indices])  # type: ignore[arg-type]
        self.action_space = self.envs.single_action_space
        self.episode_return = np.zeros(n_envs)
        self.episode_length = np.zeros(n_envs, dtype=np.int64)
        if state is not None:
            self.set_state(state)

    def get_state(self) -> dict[str, Any] | None:
        envs: list[Any]
        if hasattr(self.envs, "get_env_states"):  # a batch stepped as arrays (rollout/classic.py)
            envs = self.envs.get_env_states()
        elif not hasattr(self.envs, "envs"):  # EnvPool's: its C++ environments cannot be saved
            return None
        else:
            envs = [envstate.snapshot(env) for env in self.envs.envs]
        if any(s is None for s in envs):
            return None
        return {"envs": envs, "obs": torch.from_numpy(np.array(self.obs)),
                "episode_return": torch.from_numpy(self.episode_return.copy()),
                "episode_length": torch.from_numpy(self.episode_length.copy()),
                "action_rngs": [rng_state(rng) for rng in self.action_rngs]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["envs"]) != self.envs.num_envs:
            raise ValueError(f"the saved sampler has {len(state['envs'])} environments, this one {self.envs.num_envs}")
        if hasattr(self.envs, "set_env_states"):
            self.envs.set_env_states(state["envs"])
        else:
            for env, env_state in zip(self.envs.envs, state["envs"], strict=True):  # type: ignore[attr-defined]
                envstate.restore(env, env_state)
        self.obs = state["obs"].numpy().astype(self.obs.dtype, copy=True)
        self.episode_return = state["episode_return"].numpy().copy()
        self.episode_length = state["episode_length"].numpy().copy()
        for rng, rng_data in zip(self.action_rngs, state["action_rngs"], strict=True):
            set_rng_state(rng, rng_data)

    # Every entry of a sampler state is per environment (a list, or a tensor whose first axis is the env).
    @staticmethod
    def split_state(state: dict[str, Any], parts: int) -> list[dict[str, Any]]:
        """A sampler state of n environments as `parts` states of consecutive n / parts environments."""
        k = len(state["envs"]) // parts
        return [{name: value[i * k:(i + 1) * k] for name, value in state.items()} for i in range(parts)]

    @staticmethod
    def join_states(states: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        """The inverse of `split_state` (None when any part is)."""
        parts = [s for s in states if s is not None]
        if len(parts) < len(states):
            return None
        return {name: torch.cat([p[name] for p in parts]) if isinstance(value, torch.Tensor)
                else [x for p in parts for x in p[name]] for name, value in parts[0].items()}

    def collect(self, policy: NoisePolicy, n_steps: int) -> Rollout:
        rollout = self.begin(policy, n_steps)
        for t in range(n_steps):
            self.step(rollout, t, policy(self.obs, rollout.noise[t]))
        return rollout.finish()

    # A rollout in steps, for a caller that computes the actions itself: seeds trained together step each
    # seed's sampler with the actions of one batched policy call (algorithms/rl/batched.py).
    def begin(self, policy: NoisePolicy, n_steps: int) -> PartialRollout:
        """Buffers for n_steps, and the whole rollout's noise (`.noise[t]`, (N, k) per step)."""
        n = self.envs.num_envs
        # Each environment's whole rollout of noise at once: the same stream as drawing it step by step.
        uniforms = np.stack([rng.random((n_steps, policy.noise_dim)) for rng in self.action_rngs], axis=1)
        return PartialRollout(
            noise=policy.transform_noise(uniforms),  # (T, N, k)
            obs=np.empty((n_steps, *self.obs.shape), dtype=self.obs.dtype),
            next_obs=np.empty((n_steps, *self.obs.shape), dtype=self.obs.dtype),
            rewards=np.empty((n_steps, n), dtype=np.float32), terminated=np.empty((n_steps, n), dtype=bool),
            truncated=np.empty((n_steps, n), dtype=bool))

    def step(self, rollout: PartialRollout, t: int, actions: np.ndarray) -> None:
        """Step every environment with `actions` (as sampled) and record step t."""
        if rollout.actions is None:
            rollout.actions = np.empty((len(rollout.rewards), *actions.shape), dtype=actions.dtype)
        rollout.obs[t], rollout.actions[t] = self.obs, actions
        next_obs, reward, term, trunc, info = self.envs.step(clip_to_space(actions, self.action_space))
        rollout.rewards[t], rollout.terminated[t], rollout.truncated[t] = reward, term, trunc
        rollout.next_obs[t] = next_obs
        ended = term | trunc
        self.episode_return += reward
        self.episode_length += 1
        if ended.any():
            for i in np.flatnonzero(ended):
                rollout.next_obs[t, i] = info["final_obs"][i]
                rollout.episode_returns.append(float(self.episode_return[i]))
                rollout.episode_lengths.append(int(self.episode_length[i]))
            self.episode_return[ended] = 0.0
            self.episode_length[ended] = 0
        self.obs = next_obs

    def close(self) -> None:
        self.envs.close()


def evaluate_policy(maker: EnvMaker, act, episodes: int, seed: int, max_envs: int = 32,
                    max_episode_steps: int = 100_000) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy `act(obs) -> actions`; episode k is
    reset with a seed derived from (seed, k) alone."""
    n = min(episodes, max_envs)
    envs = maker.make_vector(n, evaluation=True)
    returns = np.zeros(episodes)
    try:
        for start in range(0, episodes, n):
            count = min(n, episodes - start)
            seeds = [derive_seed(seed, "eval", start + i) for i in range(n)]
            obs, _ = envs.reset(seed=seeds)  # type: ignore[arg-type]
            active = np.arange(n) < count
            total = np.zeros(n)
            for _ in range(max_episode_steps):
                obs, reward, term, trunc, _ = envs.step(clip_to_space(act(obs), envs.single_action_space))
                total += np.where(active, reward, 0.0)
                active &= ~(term | trunc)
                if not active.any():
                    break
            returns[start:start + count] = total[:count]
    finally:
        envs.close()
    return returns
