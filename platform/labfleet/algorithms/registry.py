"""The algorithm registry: algorithm name -> (hyperparameter model, trainer class, what it can run on).

An algorithm module registers itself at import time with `register(AlgorithmInfo(...))`. The built-in
modules are imported on first use, so `labfleet.algorithms.registry.get("ppo")` always sees them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from labfleet.algorithms.base import Trainer

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

ActionKind = Literal["discrete", "continuous"]
ObservationKind = Literal["vector", "discrete"]


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    kind: Literal["rl", "generative"]
    hparams: type[BaseModel]
    trainer: type[Trainer]
    summary: str
    action_spaces: tuple[ActionKind, ...] = ("discrete", "continuous")
    observation_spaces: tuple[ObservationKind, ...] = ("vector", "discrete")
    needs_transition_model: bool = False
    rollout_workers: bool = True  # can spread its environments over Ray rollout actors
    seed_dependent: bool = True  # False for planners, whose training the seed does not touch
    primary_metric: str = "eval/return_mean"
    # The `eval/*` metrics it can log: what a sweep objective may name (checked by `labfleet validate`).
    eval_metrics: tuple[str, ...] = ("eval/return_mean", "eval/return_std")
    budget_units: tuple[str, ...] = ("env_steps",)
    tags: dict[str, str] = field(default_factory=dict)


_REGISTRY: dict[str, AlgorithmInfo] = {}
_loaded = False


def register(info: AlgorithmInfo) -> AlgorithmInfo:
    if info.name in _REGISTRY and _REGISTRY[info.name].trainer is not info.trainer:
        raise ValueError(f"algorithm {info.name!r} is registered twice")
    _REGISTRY[info.name] = info
    return info


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> AlgorithmInfo:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r} (available: {', '.join(names())})") from None
