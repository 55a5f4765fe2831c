"""`env_wrappers` (issue 13 section 3): applied in order to every env instance a trainer makes, train-only
ones left out of evaluation, and anything that is not a `gymnasium.Wrapper` subclass refused at validation
without being called."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.cli import app
from labfleet.rollout.envs import EnvMaker
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS, run_cli
from tests.spec.test_validate import BASE, _check_refused

WRAPPED = EXPERIMENTS / "custom" / "cartpole_wrapped.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec_file


def test_wrappers_reach_training_and_evaluation(monkeypatch):
    """TimeLimit(20) then the user's RewardScale(0.5): every training episode is at most 20 steps and earns
    0.5 per step, and so does every evaluation episode."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS / "custom"))
    spec = load_spec(WRAPPED, {"env_wrappers.0.kwargs.max_episode_steps": 20, "budget.env_steps": 2048,
                               "eval.episodes": 8})
    trainer = registry.get("ppo").trainer(spec, 0, "cpu")
    while not trainer.done:
        metrics = trainer.train_iteration()
        if M.TRAIN_EPISODE_LENGTH in metrics:
            assert metrics[M.TRAIN_EPISODE_LENGTH] <= 20
            assert metrics[M.TRAIN_EPISODE_RETURN] == pytest.approx(0.5 * metrics[M.TRAIN_EPISODE_LENGTH])
    evaluation = trainer.evaluate()
    assert 0 < evaluation[M.EVAL_RETURN_MEAN] <= 10.0
    assert (evaluation[M.EVAL_RETURN_MEAN] * 2) % 0.25 == pytest.approx(0.0, abs=1e-9)  # 8 episodes of 0.5s
    trainer.close()


def test_train_only_wrappers_are_left_out_of_evaluation(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS / "custom"))
    maker = EnvMaker("CartPole-v1", {}, (("TimeLimit", {"max_episode_steps": 5}, False),
                                         ("wrappers:RewardScale", {"scale": 0.5}, True)))
    for evaluation, reward in ((False, 0.5), (True, 1.0)):
        envs = maker.make_vector(2, evaluation=evaluation)
        envs.reset(seed=[0, 1])
        rewards, ended = [], np.zeros(2, dtype=bool)
        for _ in range(5):
            _, r, term, trunc, _ = envs.step(np.zeros(2, dtype=np.int64))
            rewards.append(r[~ended])
            ended |= term | trunc
        envs.close()
        assert ended.all(), "TimeLimit(5) applies to both"
        assert set(np.concatenate(rewards).tolist()) == {reward}


@pytest.mark.parametrize(("wrapper", "field", "word"), [
    ({"type": "collections:OrderedDict"}, "env_wrappers.0.type", "the class OrderedDict"),
    ({"type": "gymnasium.envs.classic_control.cartpole:CartPoleEnv"}, "env_wrappers.0.type", "gymnasium.Wrapper"),
    ({"type": "gymnasium.wrappers.vector:NormalizeObservation"}, "env_wrappers.0.type", "gymnasium.Wrapper"),
    ({"type": "NoSuchWrapper"}, "env_wrappers.0.type", "TimeLimit"),  # the known names are listed
    ({"type": "TimeLimit", "kwargs": {"max_steps": 5}}, "env_wrappers.0.kwargs", "max_steps"),
    ({"type": "FlattenObservation", "train_only": True}, "env_wrappers.0.train_only", "changes the spaces"),
])
def test_what_is_not_a_usable_wrapper_is_refused(tmp_path: Path, wrapper: dict, field: str, word: str) -> None:
    spec_file = _write(tmp_path, {**BASE, "env": "FrozenLake-v1", "algorithm": "qlearning", "hparams": {},
                                  "env_wrappers": [wrapper]})
    _check_refused(CliRunner().invoke(app, ["validate", str(spec_file)]), spec_file, field, word)


@pytest.mark.slow
def test_a_function_named_as_a_wrapper_is_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "owned"
    spec_file = _write(tmp_path, {**BASE, "env_wrappers": [{"type": "os:system",
                                                            "kwargs": {"command": f"touch {marker}"}}]})
    for command in ("validate", "run"):
        result = run_cli(command, str(spec_file), cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert f"{spec_file}: env_wrappers.0.type: os:system must name a gymnasium.Wrapper subclass" in result.stderr
        assert not marker.exists(), f"{command} ran the command the spec named"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_generative_spec_has_no_env_to_wrap(tmp_path: Path) -> None:
    spec_file = _write(tmp_path, {"name": "vae", "algorithm": "vae", "dataset": "digits", "budget": {"epochs": 1},
                                  "env_wrappers": [{"type": "TimeLimit", "kwargs": {"max_episode_steps": 5}}]})
    _check_refused(CliRunner().invoke(app, ["validate", str(spec_file)]), spec_file, "env_wrappers", "no environment")


def test_the_shipped_wrapped_spec_validates():
    result = CliRunner().invoke(app, ["validate", str(WRAPPED)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_run_wraps_rollout_workers_and_evaluation_and_records_the_wrappers(tmp_path: Path, tracking_uri: str):
    """The whole command from another directory: the user's wrapper module is found beside the spec, the
    envs of a rollout worker (another process) are wrapped too, and normalisation runs alongside."""
    from mlflow.tracking import MlflowClient

    result = run_cli("run", str(WRAPPED), "--set", "seeds=[0]", "--set", "budget.env_steps=2048",
                     "--set", "resources.rollout_workers=1", "--set", "hparams.normalize=true",
                     "--set", "env_wrappers.0.kwargs.max_episode_steps=20", "--set", "eval.every_steps=1024",
                     "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri)
    (seed,) = [r for r in client.search_runs([client.get_experiment_by_name("custom").experiment_id])
               if r.data.tags["labfleet.role"] == "seed"]
    lengths = client.get_metric_history(seed.info.run_id, M.TRAIN_EPISODE_LENGTH)
    returns = {m.step: m.value for m in client.get_metric_history(seed.info.run_id, M.TRAIN_EPISODE_RETURN)}
    assert lengths and all(m.value <= 20 for m in lengths)
    assert all(returns[m.step] == pytest.approx(0.5 * m.value) for m in lengths)
    evaluations = client.get_metric_history(seed.info.run_id, M.EVAL_RETURN_MEAN)
    assert len(evaluations) == 2 and all(0 < m.value <= 10 for m in evaluations)
    recorded = json.loads(seed.data.params["env_wrappers"])
    assert [(w["type"], w["kwargs"]) for w in recorded] == [("TimeLimit", {"max_episode_steps": 20}),
                                                            ("wrappers:RewardScale", {"scale": 0.5})]


@pytest.mark.slow
def test_the_custom_env_example_passes_gymnasiums_checker_and_is_learned(monkeypatch):
    from gymnasium.utils.env_checker import check_env

    monkeypatch.syspath_prepend(str(EXPERIMENTS / "custom"))
    from corridor_env import Corridor

    check_env(Corridor())
    spec = load_spec(EXPERIMENTS / "custom" / "corridor_ppo.yaml")
    trainer = registry.get("ppo").trainer(spec, 3, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    assert trainer.evaluate()[M.EVAL_RETURN_MEAN] == pytest.approx(0.91)  # nine steps right
    trainer.close()


def test_observation_normalisation_needs_box_observations(tmp_path: Path) -> None:
    spec_file = _write(tmp_path, {**BASE, "env": "FrozenLake-v1", "hparams": {"normalize": True}})
    _check_refused(CliRunner().invoke(app, ["validate", str(spec_file)]), spec_file, "hparams.normalize.obs",
                   "discrete observations")
