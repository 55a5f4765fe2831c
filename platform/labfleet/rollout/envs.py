"""Environment factories and seed derivation.

Seeds for environments and action noise derive from (run seed, env index, purpose) alone, so that how
the environments are spread over processes changes speed, not results.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from a run seed and any further indices or labels, via numpy's SeedSequence."""
    entropy = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def import_path(path: str, spec_dir: str | Path | None = None) -> Any:
    """The object that "package.module:Name" names, imported as `python -m` would find it: from the spec's
    directory, then the working directory. Only the module's import runs; nothing it names is called."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not of the form package.module:Name")
    for directory in (os.getcwd(), *([str(Path(spec_dir).resolve())] if spec_dir is not None else [])):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module's own import-time code failed: the user's to see, as one line
        raise ImportError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def env_class(path: str, spec_dir: str | Path | None = None) -> type[gym.Env]:
    """The `gymnasium.Env` subclass that "package.module:Class" names; anything else (a function such as
    `os:system`, a wrapper, an instance) is refused with TypeError before it could be called."""
    obj = import_path(path, spec_dir)
    if not (isinstance(obj, type) and issubclass(obj, gym.Env)) or issubclass(obj, gym.Wrapper):
        what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise TypeError(f"{path} must name a gymnasium.Env subclass (a registered id or package.module:Class); "
                        f"it names {'the class' if isinstance(obj, type) else 'a'} {what}, which is never called")
    return obj


def _env_id(env: str) -> str:
    """Gymnasium makes entry points ("package.module:Class") only through a registration; the class is
    checked first, so a spec can make nothing but an environment."""
    if ":" not in env:
        return env
    module, _, attr = env.partition(":")
    env_id = f"labfleet-custom/{module}.{attr}"
    if env_id not in gym.registry:
        env_class(env)
        gym.register(id=env_id, entry_point=env)
    return env_id


def make_env(env: str, env_kwargs: dict[str, Any] | None = None) -> gym.Env:
    return gym.make(_env_id(env), **(env_kwargs or {}))


def make_vector_env(env: str, env_kwargs: dict[str, Any] | None, n_envs: int) -> gym.vector.VectorEnv:
    """A synchronous vector env that autoresets in the same step, so `info["final_obs"]` carries the
    last observation of an episode (needed to bootstrap a truncated one)."""
    return gym.make_vec(
        _env_id(env), num_envs=n_envs, vectorization_mode="sync",
        # The passive checker wraps every step but checks only the first; `labfleet validate` makes the env.
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}, disable_env_checker=True,
        **(env_kwargs or {}),
    )


def describe_spaces(env: gym.Env) -> tuple[str, str]:
    """(observation kind, action kind): 'vector' | 'discrete' | other, 'discrete' | 'continuous' | other."""
    obs, act = env.observation_space, env.action_space
    if isinstance(obs, gym.spaces.Discrete):
        obs_kind = "discrete"
    elif isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1:
        obs_kind = "vector"
    else:
        obs_kind = type(obs).__name__
    if isinstance(act, gym.spaces.Discrete):
        act_kind = "discrete"
    elif isinstance(act, gym.spaces.Box) and len(act.shape) == 1:
        act_kind = "continuous"
    else:
        act_kind = type(act).__name__
    return obs_kind, act_kind
