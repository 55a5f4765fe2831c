"""The shared trainer suite: every registered algorithm passes the same checks (STYLE 5).

A newly registered algorithm joins automatically; it must ship a spec in experiments/ that this suite
shrinks to a few iterations.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from labfleet.algorithms import registry
from labfleet.spec.loading import load_spec
from tests.conftest import shipped_spec_for

ALGORITHMS = registry.names()
# Keep each algorithm to a few iterations: small batches, a small budget.
SHRINK = {"n_envs": 2, "n_steps": 16, "learning_starts": 16, "batch_size": 16, "train_freq": 8,
          "gradient_steps": 2, "buffer_size": 1000, "net_arch": [32, 32]}


def tiny_spec(algorithm: str):
    spec = load_spec(shipped_spec_for(algorithm))
    hparams = {k: v for k, v in SHRINK.items() if k in spec.hparams}
    overrides = {f"hparams.{k}": v for k, v in hparams.items()}
    if spec.budget.unit == "env_steps":
        overrides["budget.env_steps"] = 2000
    else:
        overrides[f"budget.{spec.budget.unit}"] = 20
    overrides["eval.episodes"] = 2
    return load_spec(shipped_spec_for(algorithm), overrides)


def build(algorithm: str, seed: int = 0):
    spec = tiny_spec(algorithm)
    return registry.get(algorithm).trainer(spec, seed, "cpu")


def without_timing(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("time/sps")}


def test_registry_is_not_empty():
    assert "reinforce" in ALGORITHMS


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checkpoint_round_trip_gives_identical_next_actions(algorithm):
    trainer = build(algorithm)
    initial = trainer.probe()
    # Train until something that acts has changed (sparse tasks need a few episodes), so that the
    # comparison below could tell a broken restore from a good one.
    while np.array_equal(initial, trainer.probe()) and not trainer.done:
        trainer.train_iteration()
    assert not np.array_equal(initial, trainer.probe()), "training within the budget changed no action"
    data = trainer.checkpoint_bytes()
    state = torch.load(io.BytesIO(data), weights_only=True)  # a checkpoint is safe to load
    assert isinstance(state, dict)
    restored = build(algorithm)
    restored.restore_bytes(data)
    np.testing.assert_array_equal(restored.probe(), trainer.probe())
    assert restored.progress == trainer.progress
    if restored.done:
        return
    # Two restores of one checkpoint continue identically.
    again = build(algorithm)
    again.restore_bytes(data)
    assert without_timing(restored.train_iteration()) == without_timing(again.train_iteration())
    np.testing.assert_array_equal(restored.probe(), again.probe())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_seed_same_metrics_other_seed_differs(algorithm):
    runs = []
    for seed in (3, 3, 4):
        trainer = build(algorithm, seed)
        metrics = [without_timing(trainer.train_iteration()) for _ in range(3)]
        metrics.append(trainer.evaluate())
        runs.append((metrics, trainer.probe()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    if registry.get(algorithm).seed_dependent:
        assert runs[0][0] != runs[2][0]
    else:  # a planner: the seed only picks evaluation episodes
        assert runs[0][0][:-1] == runs[2][0][:-1]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trainer_pickles_for_ray(algorithm):
    trainer = build(algorithm)
    trainer.train_iteration()
    clone = pickle.loads(pickle.dumps(trainer))
    assert type(clone) is type(trainer)
    np.testing.assert_array_equal(clone.probe(), trainer.probe())
    assert clone.progress == trainer.progress


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_budget_is_respected_and_metric_names_are_shared(algorithm):
    from labfleet import metrics as M

    trainer = build(algorithm)
    names = set()
    while not trainer.done:
        names |= set(trainer.train_iteration())
    assert trainer.progress >= trainer.spec.budget.total
    final = trainer.evaluate()
    assert registry.get(algorithm).primary_metric in final
    known = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str)}
    assert names <= known, f"metric names not defined in labfleet.metrics: {names - known}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_evaluate_leaves_training_untouched(algorithm):
    a, b = build(algorithm), build(algorithm)
    a.train_iteration()
    b.train_iteration()
    a.evaluate()
    assert without_timing(a.train_iteration()) == without_timing(b.train_iteration())
