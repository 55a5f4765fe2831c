"""A trained seed back from MLflow: `labfleet.load(run_id)` and `labfleet enjoy` (rl-zoo's enjoy.py, CleanRL's
--capture-video).

A seed run holds its resolved spec (`spec.yaml`) and its checkpoint (`checkpoints/final.pt`, or
`checkpoints/latest.pt` while it trains): the trainer is rebuilt from the first and restored from the
second, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from labfleet import metrics as M
from labfleet.errors import Problem, SpecError
from labfleet.tracking import queries as Q
from labfleet.tracking import tags as tag
from labfleet.tracking.uri import resolve_tracking_uri

RUN_ID_LENGTH = 32


def _seed_run(client: MlflowClient, target: str) -> Any:
    """The seed run `target` names: a seed run id; a trial run id (its best seed); or an experiment name
    (the best seed of its latest finished trial)."""
    run = None
    if len(target) == RUN_ID_LENGTH and all(c in "0123456789abcdef" for c in target):
        run = client.get_run(target)
    else:
        experiment = client.get_experiment_by_name(target)
        if experiment is None:
            raise SpecError([Problem("labfleet enjoy", "RUN_OR_EXPERIMENT", f"no run id or experiment {target!r}")])
        trials = client.search_runs([experiment.experiment_id], f"{Q.role('trial')} and attributes.status = "
                                    "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if not trials:
            raise SpecError([Problem("labfleet enjoy", "RUN_OR_EXPERIMENT", f"experiment {target!r} has no "
                                     "finished trial")])
        run = trials[0]
    if run.data.tags.get(tag.ROLE) == "trial":
        seeds = client.search_runs([run.info.experiment_id], f"{Q.children(run.info.run_id)} and {Q.role('seed')}",
                                   max_results=1000)
        if not seeds:
            raise SpecError([Problem("labfleet enjoy", "RUN_OR_EXPERIMENT", f"trial run {run.info.run_id} has no "
                                     "seed runs")])
        metric = _primary(seeds[0].data.tags.get(tag.ALGORITHM, ""))
        lower = "elbo" in metric or "nll" in metric
        run = sorted(seeds, key=lambda r: (metric not in r.data.metrics,
                                           (1 if lower else -1) * r.data.metrics.get(metric, 0.0)))[0]
    if run.data.tags.get(tag.ROLE) != "seed":
        raise SpecError([Problem("labfleet enjoy", "RUN_OR_EXPERIMENT", f"run {run.info.run_id} is a "
                                 f"{run.data.tags.get(tag.ROLE, 'non-labfleet')} run; name a seed or trial")])
    return run


def _primary(algorithm: str) -> str:
    from labfleet.algorithms import registry

    try:
        return registry.get(algorithm).primary_metric or M.EVAL_RETURN_MEAN
    except (KeyError, ImportError, TypeError):
        return M.EVAL_RETURN_MEAN


def _artifact(client: MlflowClient, run_id: str, *paths: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="labfleet-load-") as tmp:
        for path in paths:
            try:
                return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()
            except Exception:  # noqa: BLE001 - MlflowException or OSError: try the next one
                continue
    raise SpecError([Problem("labfleet enjoy", "RUN_OR_EXPERIMENT", f"run {run_id} has none of {', '.join(paths)}")])


@dataclass
class Loaded:
    trainer: Any  # a labfleet.Trainer, restored
    run: Any  # the seed run


def load_run(target: str, tracking_uri: str | None = None, device: str = "cpu") -> Loaded:
    from labfleet.algorithms import registry
    from labfleet.spec.models import ExperimentSpec

    client = MlflowClient(resolve_tracking_uri(tracking_uri, None))
    run = _seed_run(client, target)
    spec = ExperimentSpec.model_validate(yaml.safe_load(_artifact(client, run.info.run_id, "spec.yaml")))
    trainer = registry.get(spec.algorithm).trainer(spec, int(run.data.tags[tag.SEED]), device)
    trainer.restore_bytes(_artifact(client, run.info.run_id, "checkpoints/final.pt", "checkpoints/latest.pt"))
    return Loaded(trainer, run)


def load(run_id: str, tracking_uri: str | None = None, device: str = "cpu") -> Any:
    """The trainer of a seed run (or of a trial's best seed, or an experiment's latest finished trial's),
    restored from its checkpoint: its policy and networks for your own analysis.

        import labfleet
        trainer = labfleet.load("3f2a...", tracking_uri="sqlite:///mlflow.db")
        trainer.greedy_actions(obs_batch)
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per downloaded file
    return load_run(run_id, tracking_uri, device).trainer


def play(trainer: Any, episodes: int, video_dir: Path | None, seed: int = 0) -> list[float]:
    """Returns of `episodes` episodes of the greedy policy on the trainer's env, recorded as MP4s into
    `video_dir` (gymnasium's RecordVideo) when given."""
    import gymnasium as gym

    from labfleet.rollout.envs import EnvMaker, derive_seed
    from labfleet.rollout.sampler import clip_to_space

    spec = trainer.spec
    if spec.env_backend == "envpool":
        if video_dir is not None:
            raise ValueError("videos are rendered through gymnasium; this spec steps EnvPool's environments")
        return _play_vector(trainer, EnvMaker.from_spec(spec), episodes, seed)
    env = EnvMaker.from_spec(spec).make(evaluation=True, **({"render_mode": "rgb_array"} if video_dir else {}))
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(env, str(video_dir), episode_trigger=lambda _: True, disable_logger=True)
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=derive_seed(seed, "enjoy", episode))
            total, done = 0.0, False
            while not done:
                action = clip_to_space(trainer.greedy_actions(np.asarray(obs)[None])[0], env.action_space)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def _play_vector(trainer: Any, maker: Any, episodes: int, seed: int) -> list[float]:
    """`play` on a vector env of one (EnvPool's), episode k seeded as `play` seeds it."""
    from labfleet.rollout.envs import derive_seed
    from labfleet.rollout.sampler import clip_to_space

    envs = maker.make_vector(1, evaluation=True)
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = envs.reset(seed=[derive_seed(seed, "enjoy", episode)])
            total, done = 0.0, False
            while not done:
                actions = clip_to_space(trainer.greedy_actions(np.asarray(obs)), envs.single_action_space)
                obs, reward, terminated, truncated, _ = envs.step(actions)
                total += float(reward[0])
                done = bool(terminated[0] or truncated[0])
            returns.append(total)
    finally:
        envs.close()
    return returns


def sample_grid(trainer: Any) -> dict[str, bytes]:
    """A generative model's sample images (PNG bytes by name), drawn from fixed noise in eval mode."""
    import torch

    for model in getattr(trainer, "models", {}).values():  # (a trainer of one's own may keep none there)
        model.eval()
    with torch.no_grad():
        return trainer.sample_images()
