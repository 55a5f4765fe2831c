"""Checks of a spec against the world: the env exists, and the algorithm fits the env's spaces."""

from __future__ import annotations

import difflib
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import gymnasium as gym

from labfleet.rollout.envs import EnvMaker, describe_spaces, env_class, register_atari, wrapper_class

if TYPE_CHECKING:
    from labfleet.algorithms.registry import AlgorithmInfo
    from labfleet.spec.models import ExperimentSpec


def check_env_id(env: str, spec_dir: Path | None = None) -> str | None:
    """Why `env` cannot name an environment, or None. An import path must name a `gymnasium.Env` subclass:
    it is imported (as `python -m` would, from the spec's directory or the working directory) but nothing
    it names is called here, so `env: "os:system"` is refused before anything runs."""
    if ":" in env:
        try:
            env_class(env, spec_dir)
        except (ImportError, TypeError) as exc:
            return str(exc)
        return None
    if not register_atari(env):
        return f"{env} is an Atari game: pip install 'labfleet[atari]' (ale-py, which ships the ROMs)"
    if env not in gym.registry:
        close = difflib.get_close_matches(env, list(gym.registry), n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else " (see `labfleet list envs`)"
        return f"unknown gymnasium environment {env!r}{hint}"
    return None


def _encoder_problems(spec: ExperimentSpec, spec_dir: Path | None) -> list[tuple[str, str]]:
    """`hparams.encoder: package.module:Class` must name a torch.nn.Module subclass: imported, never called."""
    encoder = spec.hparams.get("encoder")
    if not isinstance(encoder, str) or ":" not in encoder:
        return []
    from labfleet.algorithms.rl.networks import custom_encoder

    try:
        custom_encoder(encoder, str(spec_dir) if spec_dir is not None else None)
    except (ImportError, TypeError) as exc:
        return [("hparams.encoder", str(exc))]
    return []


def check_wrappers(spec: ExperimentSpec, spec_dir: Path | None = None) -> list[tuple[str, str]]:
    """Each `env_wrappers` entry must name a `gymnasium.Wrapper` subclass: imported, never called here."""
    problems = []
    for i, wrapper in enumerate(spec.env_wrappers):
        try:
            wrapper_class(wrapper.type, spec_dir)
        except (ImportError, TypeError) as exc:
            problems.append((f"env_wrappers.{i}.type", str(exc)))
    return problems


def _resource_problems(spec: ExperimentSpec) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if spec.device.startswith("cuda") and spec.resources.gpus_per_trial == 0:
        problems.append(("device", f"{spec.device} needs resources.gpus_per_trial above 0: Ray reserves no GPU for "
                                   "a trial that asks for none (use device: auto, or reserve a GPU)"))
    if spec.resources.seeds_per_actor > 1 and spec.resources.data_parallel > 1:
        problems.append(("resources.seeds_per_actor", "seeds that share an actor cannot also train data-parallel "
                         "(resources.data_parallel): use 1 for one of them"))
    return problems


def check_algorithm_fits(spec: ExperimentSpec, info: AlgorithmInfo, check_env: bool = True,
                         spec_dir: Path | None = None) -> list[tuple[str, str]]:
    """Problems as (field path, message): budget unit, the env or dataset the algorithm needs, and the
    env's spaces (the env is made once, when `check_env`)."""
    problems = _resource_problems(spec)
    if spec.eval.select_best and getattr(info.trainer, "POLICY", None) is None:
        problems.append(("eval.select_best", f"{info.name} has no policy network to select from its evaluations: "
                         f"select_best is for {', '.join(_selecting_algorithms())}"))
    if info.kind == "custom":
        if spec.resources.seeds_per_actor > 1 and info.trainer.__name__ == "FunctionTrainer":
            problems.append(("resources.seeds_per_actor", f"{info.name} is a training function, which reports "
                             f"and checkpoints itself: its seeds cannot share an actor (use 1)"))
        return problems + _custom_problems(spec, info, check_env, spec_dir)
    if spec.budget.unit not in info.budget_units:
        problems.append((f"budget.{spec.budget.unit}", f"{info.name} budgets in "
                         f"{' or '.join(info.budget_units)}, not {spec.budget.unit}"))
    if info.kind == "generative":
        return problems + _generative_problems(spec, info)
    return problems + _rl_problems(spec, info, check_env, spec_dir)


def _rl_problems(spec: ExperimentSpec, info: AlgorithmInfo, check_env: bool, spec_dir: Path | None
                 ) -> list[tuple[str, str]]:
    """A reinforcement-learning algorithm's: its env, rollout workers, encoder, backend, video and spaces."""
    problems: list[tuple[str, str]] = []
    if spec.resources.data_parallel > 1:
        problems.append(("resources.data_parallel", f"{info.name} trains in one process: use 1 (data "
                         f"parallelism is for the generative models)"))
    if spec.dataset is not None:
        problems.append(("dataset", f"{info.name} trains on an `env:`, not a dataset"))
    if spec.env is None:
        return [*problems, ("env", f"{info.name} needs an env (a gymnasium id or \"package.module:Class\")")]
    problems += _rollout_worker_problems(spec, info)
    problems += _encoder_problems(spec, spec_dir)
    if spec.env_backend == "envpool":
        return problems + _envpool_problems(spec, info, check_env)
    problems += _video_problems(spec)
    if check_env:
        problems += _env_problems(spec, info, spec_dir)
    else:
        problems += check_wrappers(spec, spec_dir)
    return problems


def _selecting_algorithms() -> list[str]:
    from labfleet.algorithms import registry

    return [name for name in registry.names() if getattr(registry.get(name).trainer, "POLICY", None) is not None]


def _video_problems(spec: ExperimentSpec) -> list[tuple[str, str]]:
    import importlib.util

    if spec.eval.video and importlib.util.find_spec("moviepy") is None:
        return [("eval.video", "recording needs moviepy: pip install 'labfleet[video]'")]
    return []


def _generative_problems(spec: ExperimentSpec, info: AlgorithmInfo) -> list[tuple[str, str]]:
    from labfleet.data.datasets import DATASETS

    problems: list[tuple[str, str]] = []
    if spec.env is not None:
        problems.append(("env", f"{info.name} trains on a `dataset:`, not an env"))
    if spec.env_wrappers:
        problems.append(("env_wrappers", f"{info.name} has no environment to wrap"))
    if spec.env_backend != "gymnasium":
        problems.append(("env_backend", f"{info.name} has no environment to step"))
    if spec.dataset is None:
        problems.append(("dataset", f"{info.name} needs a dataset (one of: {', '.join(DATASETS)})"))
    elif spec.dataset not in DATASETS:
        close = difflib.get_close_matches(spec.dataset, list(DATASETS), n=2)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        problems.append(("dataset", f"unknown dataset {spec.dataset!r}{hint}; known: {', '.join(DATASETS)}"))
    else:
        problems += _dataset_problems(spec, info)
    pac, batch = spec.hparams.get("pac", 1), spec.hparams.get("batch_size")
    world = spec.resources.data_parallel
    if batch is not None and (batch // world) % pac:
        problems.append(("hparams.pac", f"each worker's batch (batch_size {batch} / data_parallel {world} = "
                         f"{batch // world}) must be a multiple of pac ({pac})"))
    if spec.resources.rollout_workers:
        problems.append(("resources.rollout_workers", f"{info.name} does not sample environments: use 0"))
    if spec.eval.video:
        problems.append(("eval.video", f"{info.name} has no environment to record: its samples are logged as "
                         f"images (hparams.image_every)"))
    return problems


def _custom_problems(spec: ExperimentSpec, info: AlgorithmInfo, check_env: bool,
                     spec_dir: Path | None) -> list[tuple[str, str]]:
    """Your own code needs neither env nor dataset; what it names is checked as for the built-ins."""
    from labfleet.data.datasets import DATASETS

    problems: list[tuple[str, str]] = []
    if spec.resources.rollout_workers:
        problems.append(("resources.rollout_workers", f"{info.name} runs in one process: use 0"))
    if spec.resources.data_parallel > 1:
        problems.append(("resources.data_parallel", f"{info.name} runs in one process: use 1"))
    if spec.dataset is not None and spec.dataset not in DATASETS:
        problems.append(("dataset", f"unknown dataset {spec.dataset!r}; known: {', '.join(DATASETS)}"))
    if spec.env is not None and spec.env_backend == "envpool":
        return problems + _envpool_problems(spec, info, check_env)
    if spec.env is not None and check_env and (problem := check_env_id(spec.env, spec_dir)):
        problems.append(("env", problem))
    problems += check_wrappers(spec, spec_dir)
    return problems


def _dataset_problems(spec: ExperimentSpec, info: AlgorithmInfo) -> list[tuple[str, str]]:
    """The dataset's arguments, its files (headers only: shape, labels) and what the model needs of them."""
    from labfleet.data import images
    from labfleet.data.datasets import DATASETS

    assert spec.dataset is not None
    data = DATASETS[spec.dataset]
    unknown = sorted(set(spec.dataset_kwargs) - set(data.kwargs))
    if unknown:
        allowed = ", ".join(data.kwargs) if data.kwargs else "none"
        return [(f"dataset_kwargs.{unknown[0]}",
                 f"{spec.dataset} takes no argument {unknown[0]!r} (it takes: {allowed})")]
    shape, labels = data.shape, True
    if "path" in data.kwargs:
        path, size = spec.dataset_kwargs.get("path"), spec.dataset_kwargs.get("size")
        if size is not None and not (isinstance(size, list) and len(size) == 2
                                     and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096
                                             for v in size)):
            return [("dataset_kwargs.size", f"expected [height, width], whole numbers 1..4096, got {size!r}")]
        try:
            found = images.describe(spec.dataset, None if path is None else str(path),
                                    None if size is None else (size[0], size[1]))
        except (OSError, ValueError) as exc:
            return [("dataset_kwargs.path" if path is not None else "dataset", str(exc))]
        shape, labels = found.shape, found.labels
        problems = _split_problems(spec, found.n_train)
        if problems:
            return problems
    if info.needs_image_labels and len(shape) == 3 and spec.dataset != "digits" and not labels:
        return [("dataset", f"{info.name}'s sample-quality metrics on {spec.dataset} use a classifier trained on "
                 "its labels, and the files have no y_train")]
    return _architecture_problems(spec, shape)


def _split_problems(spec: ExperimentSpec, n_train: int) -> list[tuple[str, str]]:
    """n_valid, limit and eval_limit against the number of training images the files' headers give."""
    from labfleet.data.datasets import default_n_valid

    for key in ("n_valid", "limit", "eval_limit"):
        value = spec.dataset_kwargs.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return [(f"dataset_kwargs.{key}", f"expected a positive whole number, got {value!r}")]
    n_valid = spec.dataset_kwargs.get("n_valid") or default_n_valid(n_train)
    if n_valid >= n_train:
        return [("dataset_kwargs.n_valid", f"{n_valid} validation images leave none to train on "
                 f"({n_train} training images in the files)")]
    return []


def _architecture_problems(spec: ExperimentSpec, shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """A conv or resnet architecture needs images whose size its stride-2 layers can halve."""
    if spec.hparams.get("architecture") not in ("conv", "resnet"):
        return []
    if len(shape) != 3:
        return [("hparams.architecture", f"{spec.hparams['architecture']} needs an image dataset; {spec.dataset} is "
                 "points (use mlp)")]
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
    n_envs = spec.hparams.get("n_envs")
    if n_envs is not None and n_envs % workers:  # ES spreads perturbations, not environments
        return [("resources.rollout_workers", f"must divide hparams.n_envs ({n_envs}) so every worker steps "
                 f"the same number of envs")]
    return []


def _env_problems(spec: ExperimentSpec, info: AlgorithmInfo, spec_dir: Path | None) -> list[tuple[str, str]]:
    assert spec.env is not None
    problem = check_env_id(spec.env, spec_dir)
    if problem:
        return [("env", problem)]
    problems = check_wrappers(spec, spec_dir)
    if problems:
        return problems
    try:
        env = EnvMaker(spec.env, dict(spec.env_kwargs)).make()
    except Exception as exc:  # any constructor error is the user's to see, as one line
        return [("env_kwargs" if spec.env_kwargs else "env", f"{spec.env} could not be made: "
                 f"{type(exc).__name__}: {exc}")]
    spaces = (env.observation_space, env.action_space)
    for i, wrapper in enumerate(spec.env_wrappers):  # each checked class is built on the env so far
        try:
            env = wrapper_class(wrapper.type, spec_dir)(env, **wrapper.kwargs)
        except Exception as exc:
            env.close()
            return [(f"env_wrappers.{i}.kwargs" if wrapper.kwargs else f"env_wrappers.{i}.type",
                     f"{wrapper.type} could not wrap {spec.env}: {type(exc).__name__}: {exc}")]
        if not wrapper.train_only:
            spaces = (env.observation_space, env.action_space)
        elif spaces != (env.observation_space, env.action_space):
            env.close()
            return [(f"env_wrappers.{i}.train_only", f"{wrapper.type} changes the spaces, so the evaluation envs "
                     f"(made without it) would not fit the policy: only wrappers that keep them may be train-only")]
    try:
        problems = _space_problems(spec, info, env)
        if info.needs_transition_model and not hasattr(env.unwrapped, "P"):
            problems.append(("algorithm", f"{info.name} needs the transition model `env.unwrapped.P`, which "
                             f"{spec.env} does not expose"))
    finally:
        env.close()
    return problems


def _space_problems(spec: ExperimentSpec, info: AlgorithmInfo, env: Any) -> list[tuple[str, str]]:
    """The algorithm's spaces against the env's (anything with `observation_space` and `action_space`)."""
    problems = []
    obs_kind, act_kind = describe_spaces(env)
    if act_kind not in info.action_spaces:
        problems.append(("algorithm", f"{info.name} needs a {' or '.join(info.action_spaces)} action space; "
                         f"{spec.env} has {env.action_space}"))
    if obs_kind not in info.observation_spaces:
        problems.append(("algorithm", f"{info.name} needs {' or '.join(info.observation_spaces)} observations; "
                         f"{spec.env} has {env.observation_space}"))
    normalize = spec.hparams.get("normalize")
    if (normalize is True or (isinstance(normalize, dict) and normalize.get("obs"))) and obs_kind == "discrete":
        problems.append(("hparams.normalize.obs", f"{spec.env} has discrete observations (one-hot encoded): "
                         f"there is nothing to normalise; use normalize: {{reward: true}}"))
    return problems


def _envpool_problems(spec: ExperimentSpec, info: AlgorithmInfo, check_env: bool) -> list[tuple[str, str]]:
    """`env_backend: envpool`: an EnvPool id with EnvPool's options, no gymnasium wrappers, no transition model.
    Only EnvPool's option parser runs; nothing is made."""
    from labfleet.rollout import envpool_backend

    assert spec.env is not None
    problems: list[tuple[str, str]] = []
    if info.needs_transition_model:
        problems.append(("env_backend", f"{info.name} reads gymnasium's transition model and steps no "
                         f"environments: use env_backend: gymnasium"))
    if spec.env_wrappers:
        problems.append(("env_wrappers", "EnvPool's environments take no gymnasium wrappers: EnvPool's own options "
                         "go in env_kwargs (Atari: stack_num, frame_skip, episodic_life, reward_clip, ...)"))
    if spec.eval.video:
        problems.append(("eval.video", "videos are rendered through gymnasium; EnvPool's environments are not "
                         "recorded: use env_backend: gymnasium for a run with video"))
    if ":" in spec.env:
        return [*problems, ("env", f"EnvPool steps its own environments: an EnvPool id, not an import path "
                            f"({spec.env})")]
    try:
        envpool_backend.require()
    except ImportError as exc:
        return [*problems, ("env_backend", str(exc))]
    if check_env:
        problem = envpool_backend.check_task(spec.env, dict(spec.env_kwargs))
        if problem is not None:
            where = "env_kwargs" if spec.env_kwargs and "has no environment" not in problem else "env"
            return [*problems, (where, problem)]
        obs_space, act_space = envpool_backend.spaces(spec.env, dict(spec.env_kwargs))
        problems += _space_problems(spec, info, SimpleNamespace(observation_space=obs_space, action_space=act_space))
    return problems


# The packages behind gymnasium's optional families, and how to install each.
_EXTRAS = (("gymnasium.envs.box2d", "Box2D", 'pip install "gymnasium[box2d]"'),
           ("gymnasium.envs.mujoco", "mujoco", 'pip install "gymnasium[mujoco]"'),
           ("gymnasium.envs.phys2d", "jax", 'pip install "gymnasium[jax]"'),
           ("gymnasium.envs.tabular", "jax", 'pip install "gymnasium[jax]"'))


def _mujoco_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("mujoco").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


def envpool_ids() -> list[str]:
    """The ids EnvPool can step (`env_backend: envpool`), or [] where it is not installed."""
    import importlib.util

    if importlib.util.find_spec("envpool") is None:
        return []
    try:
        import envpool
    except Exception:  # noqa: BLE001 - a broken install lists nothing rather than failing `list envs`
        return []
    return sorted(envpool.list_all_envs())


def env_availability() -> list[tuple[str, str | None]]:
    """(env id, None when it can be made here, else what it needs) for every registered id, without making
    any: an id whose entry point is a function (gymnasium's stand-ins for removed envs) is unavailable."""
    import importlib.util

    register_atari("ALE/Pong-v5")  # ale-py's ids, where it is installed (gymnasium registers no plugins itself)
    out: list[tuple[str, str | None]] = []
    for env_id, spec in sorted(gym.registry.items()):
        entry = spec.entry_point
        if not isinstance(entry, str):
            out.append((env_id, "removed from gymnasium (mujoco-py era): use the -v5 version"))
            continue
        module = entry.partition(":")[0]
        need = next(((package, hint) for prefix, package, hint in _EXTRAS if module.startswith(prefix)), None)
        if need is not None and importlib.util.find_spec(need[0]) is None:
            out.append((env_id, need[1]))
        elif module == "gymnasium.envs.mujoco.pusher_v4" and _mujoco_major() >= 3:
            out.append((env_id, "needs mujoco<3 (gymnasium refuses it on mujoco 3): use the -v5 version"))
        else:
            out.append((env_id, None))
    return out
