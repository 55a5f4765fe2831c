"""Environment state in checkpoints, so that a restored trainer continues its episodes exactly.

`snapshot(env)` walks an environment's wrapper chain, from the outermost wrapper to the unwrapped env, and
returns each layer's state as plain data that `torch.load(weights_only=True)` reads back (tensors, numbers,
strings, lists, tuples, dicts); `restore(env, state)` writes it into a freshly made env of the same maker.
`snapshot` returns None where some layer cannot be saved; the trainer then restarts episodes on fresh
seeded streams (an *approximate* resume, tagged `labfleet.resume=approximate`).

Which layers can be saved:
- any layer with `get_env_state()` (plain data as above) and `set_env_state(state)`: a custom env or
  wrapper opts in this way;
- gymnasium's classic-control and toy-text envs, and gymnasium's and labfleet's own wrappers: every
  attribute, where each is plain data, a numpy array or scalar, a numpy Generator, or a gymnasium-owned
  object made of these (a wrapper's running statistics); configuration (spaces, the env spec, the inner
  env, functions) is left to the maker. An attribute of any other type makes the layer unsaveable;
- gymnasium's MuJoCo envs: the same, and the simulator's full integration state (`mj_getState` with
  `mjSTATE_INTEGRATION`: time, positions, velocities, activations, warm start, controls, applied forces).
Anything else (a custom env that does not opt in, Atari's emulator) cannot be saved.

Restoring never constructs an object a checkpoint names: values are assigned to the attributes of the
fresh env, and nested objects are filled in place.
"""

from __future__ import annotations

import collections
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from labfleet.seeding import rng_state, set_rng_state

OWN_MODULES = ("gymnasium.wrappers", "gymnasium.core", "labfleet.wrappers")
BUILTIN_ENV_MODULES = ("gymnasium.envs.classic_control", "gymnasium.envs.toy_text", "gymnasium.envs.mujoco")
SKIPPED_NAMES = {"env", "spec", "_saved_kwargs", "_ezpickle_args", "_ezpickle_kwargs", "mujoco_renderer",
                 "model", "fullpath", "metadata", "_cached_spec",
                 "P"}  # (toy text's transition table: configuration, and large)


class Unsaveable(Exception):
    """A layer holds state this module cannot write as plain data."""


def _skipped(value: Any) -> bool:
    """Configuration the maker rebuilds: spaces, envs, env specs, functions and classes."""
    return isinstance(value, (gym.Space, gym.Env, gym.envs.registration.EnvSpec, type)) or callable(value)


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, np.generic):  # first: numpy's float64 is also a Python float
        return {"__npscalar__": _encode(np.asarray(value), where)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise Unsaveable(f"{where} is an object array")
        # any dtype (FrozenLake's map is bytes): the raw bytes, with dtype and shape to read them back
        return {"__ndarray__": torch.from_numpy(np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8).copy()),
                "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.random.Generator):
        return {"__rng__": rng_state(value)}
    if isinstance(value, collections.deque):
        return {"__deque__": [_encode(v, where) for v in value], "maxlen": value.maxlen}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise Unsaveable(f"{where} has keys that are not strings or integers")
        return {"__dict__": [(k, _encode(v, f"{where}[{k!r}]")) for k, v in value.items()]}
    if type(value).__module__.startswith("gymnasium."):  # e.g. a wrapper's RunningMeanStd
        return {"__object__": _attributes(value, where)}
    raise Unsaveable(f"{where} is a {type(value).__module__}.{type(value).__qualname__}")


def _decode(data: Any, current: Any) -> Any:
    """The value `data` encodes; an encoded object is written into `current` (the fresh env's own)."""
    if isinstance(data, list):
        return [_decode(v, None) for v in data]
    if isinstance(data, tuple):
        return tuple(_decode(v, None) for v in data)
    if not isinstance(data, dict):
        return data
    if "__ndarray__" in data:
        raw = data["__ndarray__"].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if "__npscalar__" in data:
        return _decode(data["__npscalar__"], None)[()]
    if "__rng__" in data:
        gen = current if isinstance(current, np.random.Generator) else np.random.default_rng()
        set_rng_state(gen, data["__rng__"])
        return gen
    if "__deque__" in data:
        return collections.deque((_decode(v, None) for v in data["__deque__"]), maxlen=data["maxlen"])
    if "__dict__" in data:
        return {k: _decode(v, None) for k, v in data["__dict__"]}
    if "__object__" in data:
        if current is None:
            raise Unsaveable("a saved object has no counterpart in the fresh environment")
        _assign(current, data["__object__"])
        return current
    raise ValueError(f"not an encoded environment state: {sorted(data)}")


def _attributes(obj: Any, where: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {name: _encode(value, f"{where}.{name}") for name, value in vars(obj).items()
            if name not in SKIPPED_NAMES and name not in skip and not _skipped(value)}


def _assign(obj: Any, state: dict[str, Any]) -> None:
    for name, data in state.items():
        setattr(obj, name, _decode(data, getattr(obj, name, None)))


def _layers(env: gym.Env) -> list[gym.Env]:
    layers = [env]
    while isinstance(layers[-1], gym.Wrapper):
        layers.append(layers[-1].env)
    return layers


def _kind(layer: gym.Env) -> str:
    """How a layer is saved: 'own' (its get_env_state), 'mujoco', 'attributes', or '' (it cannot be)."""
    if callable(getattr(layer, "get_env_state", None)) and callable(getattr(layer, "set_env_state", None)):
        return "own"
    module = type(layer).__module__
    if isinstance(layer, gym.Wrapper):
        return "attributes" if module.startswith(OWN_MODULES) else ""
    if module.startswith("gymnasium.envs.mujoco"):
        return "mujoco"
    return "attributes" if module.startswith(BUILTIN_ENV_MODULES) else ""


def _mujoco_state(layer: Any) -> torch.Tensor:
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(layer.model, spec))
    mujoco.mj_getState(layer.model, layer.data, state, spec)
    return torch.from_numpy(state)


def _set_mujoco_state(layer: Any, state: torch.Tensor) -> None:
    import mujoco

    mujoco.mj_setState(layer.model, layer.data, state.numpy().astype(np.float64), mujoco.mjtState.mjSTATE_INTEGRATION)


def saveable(env: gym.Env) -> bool:
    """Whether every layer of `env` has a kind of state `snapshot` can write (see the module's docstring)."""
    return all(_kind(layer) for layer in _layers(env))


def snapshot(env: gym.Env) -> list[dict[str, Any]] | None:
    """Each layer's state, outermost first, or None when some layer cannot be saved."""
    states = []
    try:
        for depth, layer in enumerate(_layers(env)):
            kind, where = _kind(layer), f"{type(layer).__name__} (layer {depth})"
            if kind == "own":
                own = layer.get_env_state()  # type: ignore[attr-defined]
                states.append({"class": type(layer).__qualname__, "own": _encode(own, where)})
            elif kind == "attributes":
                states.append({"class": type(layer).__qualname__, "attributes": _attributes(layer, where)})
            elif kind == "mujoco":
                states.append({"class": type(layer).__qualname__,  # the simulator's data, apart
                               "attributes": _attributes(layer, where, frozenset({"data"})),
                               "mujoco": _mujoco_state(layer)})
            else:
                return None
    except Unsaveable:
        return None
    return states


def restore(env: gym.Env, states: list[dict[str, Any]]) -> None:
    """Write `snapshot`'s result into a fresh env made by the same maker (after its first reset)."""
    layers = _layers(env)
    if [type(layer).__qualname__ for layer in layers] != [s["class"] for s in states]:
        raise ValueError("the saved environment state is of another wrapper chain: "
                         f"{[s['class'] for s in states]} against {[type(x).__qualname__ for x in layers]}")
    for layer, state in zip(layers, states, strict=True):
        if "own" in state:
            layer.set_env_state(_decode(state["own"], None))  # type: ignore[attr-defined]
            continue
        _assign(layer, state["attributes"])
        if "mujoco" in state:
            _set_mujoco_state(layer, state["mujoco"])
