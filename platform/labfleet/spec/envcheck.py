"""Checks of a spec against the world: the env exists, and the algorithm fits the env's spaces."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import TYPE_CHECKING

import gymnasium as gym

from labfleet.rollout.envs import describe_spaces, make_env

if TYPE_CHECKING:
    from labfleet.algorithms.registry import AlgorithmInfo
    from labfleet.spec.models import ExperimentSpec


def _import_entry_point(entry: str) -> str | None:
    module_name, _, attr = entry.partition(":")
    if os.getcwd() not in sys.path:  # "mypkg.envs:MyEnv" next to the spec, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"cannot import module {module_name!r}: {exc}"
    if not hasattr(module, attr):
        return f"module {module_name!r} has no attribute {attr!r}"
    return None


def check_env_id(env: str) -> str | None:
    if ":" in env:
        return _import_entry_point(env)
    if env not in gym.registry:
        close = difflib.get_close_matches(env, list(gym.registry), n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else " (see `gymnasium.pprint_registry()`)"
        return f"unknown gymnasium environment {env!r}{hint}"
    return None


def check_algorithm_fits(spec: ExperimentSpec, info: AlgorithmInfo, check_env: bool = True) -> list[tuple[str, str]]:
    """Problems as (field path, message): budget unit, the env or dataset the algorithm needs, and the
    env's spaces (the env is made once, when `check_env`)."""
    problems: list[tuple[str, str]] = []
    if spec.budget.unit not in info.budget_units:
        problems.append((f"budget.{spec.budget.unit}", f"{info.name} budgets in "
                         f"{' or '.join(info.budget_units)}, not {spec.budget.unit}"))
    if info.kind == "generative":
        from labfleet.data.datasets import DATASETS

        if spec.env is not None:
            problems.append(("env", f"{info.name} trains on a `dataset:`, not an env"))
        if spec.dataset is None:
            problems.append(("dataset", f"{info.name} needs a dataset (one of: {', '.join(DATASETS)})"))
        elif spec.dataset not in DATASETS:
            close = difflib.get_close_matches(spec.dataset, list(DATASETS), n=2)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            problems.append(("dataset", f"unknown dataset {spec.dataset!r}{hint}; known: {', '.join(DATASETS)}"))
        else:
            problems += _architecture_problems(spec, DATASETS[spec.dataset].shape)
        if spec.resources.rollout_workers:
            problems.append(("resources.rollout_workers", f"{info.name} does not sample environments: use 0"))
        return problems
    if spec.resources.data_parallel > 1:
        problems.append(("resources.data_parallel", f"{info.name} trains in one process: use 1 (data "
                         f"parallelism is for the generative models)"))
    if spec.dataset is not None:
        problems.append(("dataset", f"{info.name} trains on an `env:`, not a dataset"))
    if spec.env is None:
        return [*problems, ("env", f"{info.name} needs an env (a gymnasium id or \"package.module:Class\")")]
    problems += _rollout_worker_problems(spec, info)
    if check_env:
        problems += _env_problems(spec, info)
    return problems


def _architecture_problems(spec: ExperimentSpec, shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """A conv architecture needs images whose size its stride-2 layers can halve."""
    if spec.hparams.get("architecture") != "conv":
        return []
    if len(shape) != 3:
        return [("hparams.architecture", f"conv needs an image dataset; {spec.dataset} is points (use mlp)")]
    layers = len(spec.hparams.get("channels") or [32, 64])
    if shape[1] % 2 ** layers or shape[2] % 2 ** layers:
        return [("hparams.channels", f"{layers} conv layers halve {shape[1]}x{shape[2]} images {layers} times: "
                 f"the size must be a multiple of {2 ** layers}")]
    return []


def _rollout_worker_problems(spec: ExperimentSpec, info: AlgorithmInfo) -> list[tuple[str, str]]:
    workers = spec.resources.rollout_workers
    if workers == 0:
        return []
    if not info.rollout_workers:
        return [("resources.rollout_workers", f"{info.name} does not sample environments: use 0")]
    n_envs = spec.hparams.get("n_envs", 1)
    if n_envs % workers:
        return [("resources.rollout_workers", f"must divide hparams.n_envs ({n_envs}) so every worker steps "
                 f"the same number of envs")]
    return []


def _env_problems(spec: ExperimentSpec, info: AlgorithmInfo) -> list[tuple[str, str]]:
    assert spec.env is not None
    problem = check_env_id(spec.env)
    if problem:
        return [("env", problem)]
    try:
        env = make_env(spec.env, spec.env_kwargs)
    except Exception as exc:  # any constructor error is the user's to see, as one line
        return [("env_kwargs" if spec.env_kwargs else "env", f"{spec.env} could not be made: "
                 f"{type(exc).__name__}: {exc}")]
    problems = []
    try:
        obs_kind, act_kind = describe_spaces(env)
        if act_kind not in info.action_spaces:
            problems.append(("algorithm", f"{info.name} needs a {' or '.join(info.action_spaces)} action space; "
                             f"{spec.env} has {env.action_space}"))
        if obs_kind not in info.observation_spaces:
            problems.append(("algorithm", f"{info.name} needs {' or '.join(info.observation_spaces)} observations; "
                             f"{spec.env} has {env.observation_space}"))
        if info.needs_transition_model and not hasattr(env.unwrapped, "P"):
            problems.append(("algorithm", f"{info.name} needs the transition model `env.unwrapped.P`, which "
                             f"{spec.env} does not expose"))
    finally:
        env.close()
    return problems
