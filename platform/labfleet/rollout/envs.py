"""Environment factories and seed derivation.

Seeds for environments and action noise derive from (run seed, env index, purpose) alone, so that how
the environments are spread over processes changes speed, not results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym

from labfleet.seeding import derive_seed
from labfleet.usercode import import_path

__all__ = ["derive_seed"]  # kept here too: most callers import it from this module


def env_class(path: str, spec_dir: str | Path | None = None) -> type[gym.Env]:
    """The `gymnasium.Env` subclass that "package.module:Class" names; anything else (a function such as
    `os:system`, a wrapper, an instance) is refused with TypeError before it could be called."""
    obj = import_path(path, spec_dir)
    if not (isinstance(obj, type) and issubclass(obj, gym.Env)) or issubclass(obj, gym.Wrapper):
        what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise TypeError(f"{path} must name a gymnasium.Env subclass (a registered id or package.module:Class); "
                        f"it names {'the class' if isinstance(obj, type) else 'a'} {what}, which is never called")
    return obj


def wrapper_class(name: str, spec_dir: str | Path | None = None) -> type[gym.Wrapper]:
    """The `gymnasium.Wrapper` subclass that NAME names: a class of `gymnasium.wrappers` ("TimeLimit") or an
    import path ("package.module:Class"). Anything else is refused with TypeError before it could be called."""
    if ":" in name:
        obj = import_path(name, spec_dir)
    else:
        obj = getattr(gym.wrappers, name, None)
        if obj is None:
            known = ", ".join(gymnasium_wrappers())
            raise TypeError(f"gymnasium.wrappers has no {name!r}; use one of {known}, or package.module:Class")
    if not (isinstance(obj, type) and issubclass(obj, gym.Wrapper)):
        what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise TypeError(f"{name} must name a gymnasium.Wrapper subclass; it names "
                        f"{'the class' if isinstance(obj, type) else 'a'} {what}, which is never called")
    return obj


def gymnasium_wrappers() -> list[str]:
    """The names of `gymnasium.wrappers` that wrap one environment (vector wrappers excluded)."""
    return sorted(name for name in dir(gym.wrappers) if isinstance(getattr(gym.wrappers, name), type)
                  and issubclass(getattr(gym.wrappers, name), gym.Wrapper))


def register_atari(env: str) -> bool:
    """Registers ale-py's ids ("ALE/Pong-v5", and the older "PongNoFrameskip-v4" that rl-zoo names) when `env`
    is not a registered id (gymnasium >= 1.0 loads no plugins itself); False when it is an Atari id and ale-py
    is not installed."""
    if env in gym.registry or ":" in env:
        return True
    try:
        import ale_py
    except ImportError:
        return not (env.startswith("ALE/") or "NoFrameskip" in env)
    gym.register_envs(ale_py)
    return True


def _env_id(env: str) -> str:
    """Gymnasium makes entry points ("package.module:Class") only through a registration; the class is
    checked first, so a spec can make nothing but an environment."""
    if ":" not in env:
        register_atari(env)
        return env
    module, _, attr = env.partition(":")
    env_id = f"labfleet-custom/{module}.{attr}"
    if env_id not in gym.registry:
        env_class(env)
        gym.register(id=env_id, entry_point=env)
    return env_id


@dataclass(frozen=True)
class EnvMaker:
    """Everything that makes one of a spec's environments: the id or import path, gym.make's keyword
    arguments and the wrappers applied in order to every instance (training, rollout workers, and, but for
    the `train_only` ones, evaluation and replays). Small and picklable: it travels to Ray workers."""

    env: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    wrappers: tuple[tuple[str, dict[str, Any], bool], ...] = ()  # (name, kwargs, train_only)
    backend: str = "gymnasium"  # or "envpool": `kwargs` are then EnvPool's options (rollout/envpool_backend.py)

    @classmethod
    def from_spec(cls, spec: Any) -> EnvMaker:
        assert spec.env is not None
        return cls(spec.env, dict(spec.env_kwargs),
                   tuple((w.type, dict(w.kwargs), w.train_only) for w in spec.env_wrappers), spec.env_backend)

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        """One environment's (observation space, action space), as the policy sees them."""
        if self.backend == "envpool":
            from labfleet.rollout import envpool_backend

            return envpool_backend.spaces(self.env, self.kwargs)
        env = self.make()
        try:
            return env.observation_space, env.action_space
        finally:
            env.close()

    def _wrappers(self, evaluation: bool) -> list[Any]:
        return [partial(wrapper_class(name), **kwargs) for name, kwargs, train_only in self.wrappers
                if not (evaluation and train_only)]

    def make(self, evaluation: bool = False, **overrides: Any) -> gym.Env:
        """One environment (gymnasium's; a spec on EnvPool steps vector envs only, see `make_vector`)."""
        if self.backend == "envpool":
            raise ValueError(f"{self.env} runs on EnvPool (env_backend: envpool), which makes vector envs only")
        env = gym.make(_env_id(self.env), **{**self.kwargs, **overrides})
        for wrap in self._wrappers(evaluation):
            env = wrap(env)
        return env

    def make_vector(self, n_envs: int, evaluation: bool = False) -> gym.vector.VectorEnv:
        """A synchronous vector env that autoresets in the same step, so `info["final_obs"]` carries the
        last observation of an episode (needed to bootstrap a truncated one); `evaluation` leaves out the
        train-only wrappers. On EnvPool, the same semantics (`envpool_backend.EnvPoolVectorEnv`); where
        `rollout/classic.py` steps the environment as arrays, its vector env (the same steps to the bit)."""
        if self.backend == "envpool":
            from labfleet.rollout.envpool_backend import EnvPoolVectorEnv

            return EnvPoolVectorEnv(self.env, n_envs, self.kwargs, evaluation)
        from labfleet.rollout.classic import fast_vector_env

        wrappers = self._wrappers(evaluation)
        fast = fast_vector_env(self.env, self.kwargs, tuple(wrappers), n_envs)  # the same steps, as arrays
        if fast is not None:
            return fast
        return gym.make_vec(
            _env_id(self.env), num_envs=n_envs, vectorization_mode="sync",
            # The passive checker wraps every step but checks only the first; `labfleet validate` makes the env.
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}, disable_env_checker=True,
            wrappers=wrappers or None,
            **self.kwargs,
        )


def make_env(env: str, env_kwargs: dict[str, Any] | None = None) -> gym.Env:
    return EnvMaker(env, dict(env_kwargs or {})).make()


def describe_spaces(env: gym.Env) -> tuple[str, str]:
    """(observation kind, action kind): 'vector' | 'discrete' | 'image' (a rank 2 or 3 box) | other,
    'discrete' | 'continuous' | other."""
    obs, act = env.observation_space, env.action_space
    if isinstance(obs, gym.spaces.Discrete):
        obs_kind = "discrete"
    elif isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1:
        obs_kind = "vector"
    elif isinstance(obs, gym.spaces.Box) and len(obs.shape) in (2, 3):
        obs_kind = "image"
    else:
        obs_kind = type(obs).__name__
    if isinstance(act, gym.spaces.Discrete):
        act_kind = "discrete"
    elif isinstance(act, gym.spaces.Box) and len(act.shape) == 1:
        act_kind = "continuous"
    else:
        act_kind = type(act).__name__
    return obs_kind, act_kind
