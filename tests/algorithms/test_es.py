"""Evolution strategies: centred ranks and the antithetic estimator against hand-computed values, the
estimator's direction on a known objective, worker-count equivalence on real Ray actors, and learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.es import antithetic_gradient, centered_ranks
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


def test_centered_ranks_by_hand():
    np.testing.assert_allclose(centered_ranks(np.array([3.0, 1.0, 2.0, 10.0])), [1 / 6, -0.5, -1 / 6, 0.5])
    # Only the order matters: any increasing transform of the returns gives the same ranks.
    x = np.array([-5.0, 0.1, 300.0, 2.0, 7.0])
    np.testing.assert_array_equal(centered_ranks(x), centered_ranks(np.exp(x / 100)))
    assert centered_ranks(x).sum() == pytest.approx(0.0)


def test_antithetic_gradient_by_hand():
    eps = np.array([[1.0, 0.0], [0.0, 2.0]])
    # (u+ - u-) = [1, -1];  1 * [1, 0] - 1 * [0, 2] = [1, -2];  / (2 * n * sigma) = / 0.4
    g = antithetic_gradient(np.array([0.5, -0.5]), np.array([-0.5, 0.5]), eps, sigma=0.1)
    np.testing.assert_allclose(g, [2.5, -5.0])


def test_estimator_points_up_the_gradient_of_a_known_objective():
    """For F(theta) = -|theta - c|^2 the estimate from raw fitness is unbiased for the smoothed gradient
    -2 (theta - c); with centred ranks it keeps the direction."""
    rng = np.random.default_rng(0)
    theta, c, sigma, n = np.zeros(5), np.array([1.0, -2.0, 0.5, 3.0, 0.0]), 0.1, 20_000
    eps = rng.standard_normal((n, 5))
    f_pos = -((theta + sigma * eps - c) ** 2).sum(1)
    f_neg = -((theta - sigma * eps - c) ** 2).sum(1)
    raw = antithetic_gradient(f_pos, f_neg, eps, sigma)
    np.testing.assert_allclose(raw, -2 * (theta - c), atol=0.3)  # the error's std is about 0.05
    shaped = centered_ranks(np.concatenate([f_pos, f_neg]))
    ranked = antithetic_gradient(shaped[:n], shaped[n:], eps, sigma)
    cosine = ranked @ (c - theta) / (np.linalg.norm(ranked) * np.linalg.norm(c - theta))
    assert cosine > 0.95


def _trainer(workers: int, seed: int = 0):
    spec = load_spec(EXPERIMENTS / "cartpole_es.yaml", {"budget.env_steps": 6000, "hparams.population_size": 12,
                                                       "hparams.chunk": 4, "resources.rollout_workers": workers,
                                                       "resources.cpus_per_worker": 0.5})
    return registry.get("es").trainer(spec, seed, "cpu")


@pytest.mark.slow
def test_worker_count_changes_speed_not_results(ray_local):
    thetas, logs = [], []
    for workers in (0, 1, 2):
        trainer = _trainer(workers)
        logs.append([trainer.train_iteration() for _ in range(3)])
        thetas.append(trainer.theta.detach().clone())
        trainer.close()
    for other in thetas[1:]:
        torch.testing.assert_close(other, thetas[0], rtol=0, atol=0)
    for other in logs[1:]:
        assert [m["train/episode_return"] for m in other] == [m["train/episode_return"] for m in logs[0]]


@pytest.mark.slow
def test_noise_table_is_shared_not_copied_per_call(ray_local):
    """The table is made from the seed and goes to the workers once; each iteration ships theta alone."""
    trainer = _trainer(2)
    trainer.train_iteration()
    table = trainer.noise
    assert table.dtype == np.float32 and len(table) == trainer.hp.noise_table_size
    np.testing.assert_array_equal(table[:5], _trainer(0).noise[:5])  # the seed alone fixes it
    trainer.close()


@pytest.mark.slow
def test_es_learns_cartpole():
    # 300k of the shipped 1M steps; measured 500 on seed 100 at 300k (random: about 22).
    spec = load_spec(EXPERIMENTS / "cartpole_es.yaml", {"budget.env_steps": 200_000, "eval.episodes": 10})
    trainer = registry.get("es").trainer(spec, 0, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    assert trainer.evaluate()["eval/return_mean"] >= 200
