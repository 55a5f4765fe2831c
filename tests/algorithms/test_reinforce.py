"""REINFORCE: learns CartPole; runs with continuous actions and discrete observations."""

from __future__ import annotations

import numpy as np
import pytest

from labfleet.algorithms.rl.reinforce import ReinforceTrainer
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

SPEC = EXPERIMENTS / "cartpole_reinforce.yaml"


def train(overrides: dict, seed: int) -> ReinforceTrainer:
    trainer = ReinforceTrainer(load_spec(SPEC, overrides), seed, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    return trainer


@pytest.mark.slow
def test_learns_cartpole():
    # A uniformly random policy scores about 22. Measured at this budget: 500, 325, 471 (seeds 0-2).
    returns = [train({"budget.env_steps": 80_000}, seed).evaluate()["eval/return_mean"] for seed in (0, 1, 2)]
    assert np.mean(returns) >= 300, returns
    assert min(returns) >= 150, returns


def test_gaussian_policy_on_pendulum():
    trainer = train({"env": "Pendulum-v1", "budget.env_steps": 1024, "hparams.n_envs": 2,
                     "hparams.n_steps": 64, "eval.episodes": 2}, 0)
    actions = trainer.probe()
    assert actions.shape == (64, 1) and actions.dtype == np.float32
    assert np.isfinite(trainer.evaluate()["eval/return_mean"])


def test_one_hot_observations_on_frozenlake():
    trainer = train({"env": "FrozenLake-v1", "budget.env_steps": 1024, "hparams.n_envs": 2,
                     "hparams.n_steps": 64, "eval.episodes": 3}, 0)
    assert set(np.unique(trainer.probe())) <= {0, 1, 2, 3}
    assert 0.0 <= trainer.evaluate()["eval/return_mean"] <= 1.0
