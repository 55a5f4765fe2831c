"""The algorithm registry: algorithm name -> (hyperparameter model, trainer class, what it can run on).

An algorithm module registers itself at import time with `register(AlgorithmInfo(...))`. The built-in
modules are imported on first use, so `labfleet.algorithms.registry.get("ppo")` always sees them.
"""

from __future__ import annotations

import importlib

from labfleet.algorithms.info import ActionKind, AlgorithmInfo, ObservationKind

__all__ = ["ActionKind", "AlgorithmInfo", "ObservationKind", "get", "register"]

BUILTIN_MODULES = (
    "labfleet.algorithms.rl.reinforce",
    "labfleet.algorithms.rl.a2c",
    "labfleet.algorithms.rl.ppo",
    "labfleet.algorithms.rl.qlearning",
    "labfleet.algorithms.rl.sarsa",
    "labfleet.algorithms.rl.value_iteration",
    "labfleet.algorithms.rl.policy_iteration",
    "labfleet.algorithms.rl.mc_control",
    "labfleet.algorithms.rl.trpo",
    "labfleet.algorithms.rl.es",
    "labfleet.algorithms.rl.dqn",
    "labfleet.algorithms.rl.ddpg",
    "labfleet.algorithms.generative.vae",
    "labfleet.algorithms.generative.gan",
)

_REGISTRY: dict[str, AlgorithmInfo] = {}
_loaded = False


def register(info: AlgorithmInfo) -> AlgorithmInfo:
    if info.name in _REGISTRY and _REGISTRY[info.name].trainer is not info.trainer:
        raise ValueError(f"algorithm {info.name!r} is registered twice")
    _REGISTRY[info.name] = info
    return info


ENTRY_POINT_GROUP = "labfleet.algorithms"


def _load_builtins() -> None:
    """The built-in modules, then installed packages' algorithms: entry points of the group
    `labfleet.algorithms`, each a module that registers itself or a `labfleet.Trainer` subclass (registered
    under the entry point's name)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if isinstance(loaded, type) and entry.name not in _REGISTRY:
            from dataclasses import replace

            from labfleet.algorithms.custom import custom_info

            register(replace(custom_info(entry.value), name=entry.name))


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str, spec_dir: str | None = None) -> AlgorithmInfo:
    """A registered algorithm, or for "package.module:Name" the user's own trainer class or training
    function (imported from `spec_dir` or the working directory; raises ImportError or TypeError)."""
    _load_builtins()
    if ":" in name and name not in _REGISTRY:
        from labfleet.algorithms.custom import custom_info

        return custom_info(name, spec_dir)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r} (available: {', '.join(names())}, or "
                       f"package.module:Name for your own trainer class or training function)") from None
