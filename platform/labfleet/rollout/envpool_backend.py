"""EnvPool (`env_backend: envpool`, `pip install 'labfleet[envpool]'`): environments stepped as a batch in C++.

`EnvPoolVectorEnv` puts an EnvPool pool behind the vector-env interface the samplers use, with the same
semantics as gymnasium's synchronous vector env there:
- **same-step autoreset**: an episode's last observation is `info["final_obs"][i]` and `obs[i]` is already
  the next episode's first. EnvPool itself resets an env on the step *after* its episode ended, ignoring
  that step's action (NEXT_STEP); the adapter resets the ended envs by id at once instead, so every action
  steps an episode and a truncated episode is bootstrapped from its true last observation;
- **one seed per environment**: `reset(seed=[s_0, ..., s_n-1])` seeds env i with s_i (EnvPool's `env_seed`),
  so environment i of a trial sees the same episodes whether a trial's process steps it or a rollout worker
  does. EnvPool fixes seeds when a pool is made, so a seeded reset makes a new pool (about 1 ms for 64
  CartPoles, 12 ms for 8 Hoppers); an unseeded reset goes on with the pool's streams.

Its environments are EnvPool's own C++ implementations: CartPole, Pendulum and the MuJoCo tasks match
gymnasium's step for step from the same state (`tests/rollout/test_envpool.py`), but not their random
resets, so runs on the two backends differ as two seeds would. EnvPool's Atari ids ("Pong-v5") carry its own
preprocessing (84x84 grey frames, 4 stacked, frame skip 4, 30 no-ops), set by `env_kwargs`; evaluations use
the game's own rewards and lives (`episodic_life` and `reward_clip` off).

Environment state cannot be saved (a restored trainer restarts its episodes: an approximate resume), and
`env_wrappers` do not apply (EnvPool's options go in `env_kwargs`).
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import gymnasium as gym
import numpy as np

INT32_MAX = 2**31 - 1
# Turned off in evaluations so that they report the game's own returns (as train-only wrappers do).
EVALUATION_OVERRIDES = {"episodic_life": False, "reward_clip": False}
DEFAULT_THREADS = 1  # one stepping thread a pool; `env_kwargs: {num_threads: N}` for more


def require() -> Any:
    """The envpool module, or ImportError saying how to install it."""
    try:
        import envpool
    except ImportError:
        raise ImportError("EnvPool is not installed: pip install 'labfleet[envpool]'") from None
    return envpool


def check_task(env: str, kwargs: dict[str, Any]) -> str | None:
    """Why EnvPool cannot make `env` with `kwargs` (None when it can): an unknown id, or an unknown or bad
    option. Builds EnvPool's config only; no environment is made. ImportError without EnvPool."""
    known = require().list_all_envs()
    if env not in known:
        close = difflib.get_close_matches(env.removeprefix("ALE/"), known, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        return f"EnvPool has no environment {env!r}{hint}; `envpool.list_all_envs()` lists them"
    try:
        _spec(env, kwargs)
    except Exception as exc:  # EnvPool's own message names the option
        return f"EnvPool cannot make {env} with env_kwargs {kwargs}: {type(exc).__name__}: {exc}"
    return None


def _options(env: str, kwargs: dict[str, Any], evaluation: bool = False) -> dict[str, Any]:
    options = {"num_threads": DEFAULT_THREADS, **kwargs}
    if evaluation:  # only the options this task has (Atari's)
        config = require().make_spec(env).config._asdict()
        options.update({k: v for k, v in EVALUATION_OVERRIDES.items() if k in config})
    return options


def _spec(env: str, kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():  # EnvPool builds float32 boxes from float64 bounds, which gymnasium warns of
        warnings.simplefilter("ignore")
        return require().make_spec(env, **_options(env, kwargs))


def spaces(env: str, kwargs: dict[str, Any]) -> tuple[gym.Space, gym.Space]:
    """One environment's (observation space, action space), without making it."""
    spec = _spec(env, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs, act = spec.gymnasium_observation_space, spec.gymnasium_action_space
    if isinstance(act, gym.spaces.Box) and act.dtype == np.float64:  # MuJoCo: float32 actions, as gymnasium's
        act = gym.spaces.Box(act.low.astype(np.float32), act.high.astype(np.float32), dtype=np.float32)
    return obs, act


class EnvPoolVectorEnv(gym.vector.VectorEnv):
    """`num_envs` EnvPool environments with same-step autoreset and a seed each (see the module)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, env: str, num_envs: int, kwargs: dict[str, Any] | None = None, evaluation: bool = False):
        self.task = env
        self.num_envs = num_envs
        self.options = _options(env, dict(kwargs or {}), evaluation)
        self.single_observation_space, self.single_action_space = spaces(env, self.options)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._pool: Any = None
        self._seeds: list[int] = list(range(num_envs))

    def _make(self, seeds: list[int]) -> None:
        if self._pool is not None:
            self._pool.close()
        self._seeds = seeds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._pool = require().make_gymnasium(self.task, num_envs=self.num_envs, env_seed=seeds, **self.options)
            _ = self._pool.observation_space, self._pool.action_space  # built (and cached) on first use: warns

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds for {self.num_envs} environments")
            self._make([int(s) % INT32_MAX for s in seeds])
        elif self._pool is None:
            self._make(self._seeds)
        obs, info = self._pool.reset()
        return obs, dict(info)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._pool is None:
            raise RuntimeError("reset() the environments before stepping them")
        obs, reward, terminated, truncated, info = self._pool.step(np.asarray(actions))
        info = dict(info)
        ended = np.logical_or(terminated, truncated)
        if ended.any():
            ids = np.flatnonzero(ended)
            info["final_obs"], info["_final_obs"] = obs.copy(), ended
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                first, reset_info = self._pool.reset(ids.astype(np.int32))
            obs = obs.copy()
            obs[np.asarray(reset_info["env_id"])] = first
        return obs, reward, terminated, truncated, info

    def close_extras(self, **kwargs: Any) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
