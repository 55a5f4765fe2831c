"""`labfleet list` and `labfleet show` match the registry and the hyperparameter models."""

from __future__ import annotations

import gymnasium as gym
from typer.testing import CliRunner

from labfleet.algorithms import registry
from labfleet.cli import app


def test_list_algorithms_matches_the_registry():
    result = CliRunner().invoke(app, ["list", "algorithms"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = {line.split("│")[1].strip() for line in result.output.splitlines()
              if line.startswith("│") and line.split("│")[1].strip()}
    assert listed == set(registry.names())


def test_list_envs_matches_gymnasium():
    result = CliRunner().invoke(app, ["list", "envs"])
    assert result.exit_code == 0
    assert set(result.output.split()) == set(gym.registry)


def test_list_rejects_other_words():
    result = CliRunner().invoke(app, ["list", "planets"])
    assert result.exit_code == 2 and "expected algorithms, envs or datasets" in result.output


def test_list_datasets_matches_the_dataset_table():
    from labfleet.data.datasets import DATASETS

    result = CliRunner().invoke(app, ["list", "datasets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = {line.split("│")[1].strip() for line in result.output.splitlines()
              if line.startswith("│") and line.split("│")[1].strip()}
    assert listed == set(DATASETS) >= {"digits", "ring8", "grid25"}


def test_show_prints_every_hyperparameter_with_its_default():
    result = CliRunner().invoke(app, ["show", "ppo"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    fields = registry.get("ppo").hparams.model_fields
    for name in fields:
        assert f"│ {name} " in result.output, name
    row = next(line for line in result.output.splitlines() if line.startswith("│ clip_range "))
    assert "0.2" in row and "Surrogate clipping epsilon" in row


def test_show_unknown_algorithm():
    result = CliRunner().invoke(app, ["show", "ppo2"])
    assert result.exit_code == 2 and "unknown algorithm 'ppo2'" in result.output
