"""Classic-control environments stepped as one numpy batch, bit-identical to gymnasium's.

`CartPoleVector(n)` is `gym.make_vec("CartPole-v1", n, vectorization_mode="sync", vector_kwargs=
{"autoreset_mode": SAME_STEP})` without the n Python environments: the same physics, written as array
operations in the same order of floating-point operations (so each environment's trajectory is the same
to the bit), the same per-environment random streams (one `numpy.random.Generator` per environment, seeded
as gymnasium seeds it, drawn from at each reset), the same time limit and the same same-step autoreset with
`info["final_obs"]`. gymnasium's own vectorised CartPole (`vectorization_mode="vector_entry_point"`) shares
one random stream between its environments and resets on the next step, so a trial's results would depend
on how its environments are spread over processes; this one's do not.

One vector step of 8 environments costs 40 % of gymnasium's (`benchmarks/classic_envs.py`). The
sampler uses it where a spec names `CartPole-v1` with no `env_kwargs` and no wrappers
(`EnvMaker.make_vector`); anything else gets gymnasium's environments. Its state in checkpoints is plain
data per environment (`get_env_states` / `set_env_states`), and it also reads the state gymnasium's
environments leave in a checkpoint (`rollout/envstate.py`), so older checkpoints resume on it.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from labfleet.seeding import rng_state, set_rng_state


class CartPoleVector(gym.vector.VectorEnv):
    """`num_envs` CartPole-v1 environments (see the module's docstring)."""

    # gymnasium's CartPoleEnv constants, computed as it computes them
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass = masspole + masscart
    polemass_length = masspole * length
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4
    max_episode_steps = 500

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int):
        self.num_envs = num_envs
        reference = gym.make("CartPole-v1", disable_env_checker=True)
        self.single_observation_space = reference.observation_space
        self.single_action_space = reference.action_space
        reference.close()
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.state = np.zeros((num_envs, 4), dtype=np.float64)
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self.rngs: list[np.random.Generator | None] = [None] * num_envs
        self._ready = False

    def _reset_one(self, i: int, seed: int | None = None) -> None:
        if seed is not None or self.rngs[i] is None:
            self.rngs[i] = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        rng = self.rngs[i]
        assert rng is not None
        self.state[i] = rng.uniform(low=-0.05, high=0.05, size=(4,))
        self.elapsed[i] = 0

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if options:
            raise ValueError("CartPoleVector takes no reset options")
        seeds: list[int | None]
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_envs} environments")
        for i, s in enumerate(seeds):
            self._reset_one(i, s)
        self._ready = True
        return self.state.astype(np.float32), {}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._ready:
            raise gym.error.ResetNeeded("call reset before step")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or ((actions != 0) & (actions != 1)).any():
            raise ValueError(f"expected {self.num_envs} actions in {{0, 1}}, got {actions!r}")
        state = self.state
        x, x_dot, theta, theta_dot = state[:, 0], state[:, 1], state[:, 2], state[:, 3]
        force = np.where(actions == 1, self.force_mag, -self.force_mag)
        costheta = np.cos(theta)
        sintheta = np.sin(theta)
        temp = (force + self.polemass_length * np.square(theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * np.square(costheta) / self.total_mass))
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        x = x + self.tau * x_dot  # new arrays: the old values are read below before the state is written
        x_dot = x_dot + self.tau * xacc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * thetaacc
        state[:, 0], state[:, 1], state[:, 2], state[:, 3] = x, x_dot, theta, theta_dot
        self.elapsed += 1
        terminated = ((x < -self.x_threshold) | (x > self.x_threshold)
                      | (theta < -self.theta_threshold_radians) | (theta > self.theta_threshold_radians))
        truncated = self.elapsed >= self.max_episode_steps
        obs = state.astype(np.float32)
        rewards = np.ones(self.num_envs, dtype=np.float64)
        infos: dict[str, Any] = {}
        ended = terminated | truncated
        if ended.any():
            final = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(ended):
                final[i] = obs[i].copy()
                self._reset_one(int(i))
                obs[i] = self.state[i].astype(np.float32)
            infos = {"final_obs": final, "_final_obs": ended.copy(),
                     "final_info": {}, "_final_info": ended.copy()}
        return obs, rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        pass

    # Checkpoints: one entry per environment, so that a sampler state splits and joins by environment.
    def get_env_states(self) -> list[dict[str, Any]]:
        return [{"cartpole": torch.from_numpy(self.state[i].copy()), "elapsed": int(self.elapsed[i]),
                 "rng": rng_state(rng) if (rng := self.rngs[i]) is not None else None}
                for i in range(self.num_envs)]

    def set_env_states(self, states: list[Any]) -> None:
        if len(states) != self.num_envs:
            raise ValueError(f"the saved state has {len(states)} environments, this one {self.num_envs}")
        for i, saved in enumerate(states):
            if isinstance(saved, list):  # a gymnasium environment's layers (rollout/envstate.py)
                saved = _from_gymnasium(saved)
            self.state[i] = saved["cartpole"].numpy()
            self.elapsed[i] = saved["elapsed"]
            if saved["rng"] is not None:
                rng = self.rngs[i] or np.random.default_rng()
                set_rng_state(rng, saved["rng"])
                self.rngs[i] = rng
        self._ready = True


def _from_gymnasium(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """`CartPoleVector`'s state of one environment from `envstate.snapshot` of gymnasium's CartPole-v1
    (TimeLimit, OrderEnforcing, CartPoleEnv)."""
    from labfleet.rollout.envstate import _decode

    by_class = {layer["class"]: layer.get("attributes", {}) for layer in layers}
    if set(by_class) != {"TimeLimit", "OrderEnforcing", "CartPoleEnv"}:
        raise ValueError(f"not the state of gymnasium's CartPole-v1: layers {[x['class'] for x in layers]}")
    env, limit = by_class["CartPoleEnv"], by_class["TimeLimit"]
    rng = _decode(env["_np_random"], None) if env.get("_np_random") is not None else None
    return {"cartpole": torch.from_numpy(np.asarray(_decode(env["state"], None), dtype=np.float64)),
            "elapsed": int(_decode(limit["_elapsed_steps"], None)),
            "rng": rng_state(rng) if rng is not None else None}


def fast_vector_env(env: str, kwargs: dict[str, Any], wrappers: tuple[Any, ...],
                    n_envs: int) -> gym.vector.VectorEnv | None:
    """A batch `n_envs` of what `env` names, stepped as arrays, where this module has it; else None."""
    if env == "CartPole-v1" and not kwargs and not wrappers:
        return CartPoleVector(n_envs)
    return None
