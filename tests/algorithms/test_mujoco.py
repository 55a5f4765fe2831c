"""MuJoCo (issue 13 section 4): the shipped InvertedPendulum spec reaches its bar (eval return >= 950
within 200k env steps) on a seed it was never run on before, and the locomotion specs validate."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.cli import app
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

MUJOCO = EXPERIMENTS / "mujoco"


@pytest.mark.slow
def test_inverted_pendulum_spec_learns_within_its_budget():
    spec = load_spec(MUJOCO / "inverted_pendulum_ppo.yaml")
    trainer = registry.get("ppo").trainer(spec, 7, "cpu")
    best, next_eval = float("-inf"), spec.eval.every_steps
    while not trainer.done and best < 950:
        trainer.train_iteration()
        if trainer.env_steps >= next_eval:
            next_eval += spec.eval.every_steps
            best = max(best, trainer.evaluate()[M.EVAL_RETURN_MEAN])
    trainer.close()
    assert best >= 950, f"best evaluation {best} after {trainer.env_steps} steps"
    assert trainer.env_steps <= 200_000


@pytest.mark.parametrize("name", ["inverted_pendulum_ppo.yaml", "hopper_ppo.yaml", "halfcheetah_ppo.yaml"])
def test_mujoco_specs_validate(name):
    result = CliRunner().invoke(app, ["validate", str(MUJOCO / name)])
    assert result.exit_code == 0, result.output
