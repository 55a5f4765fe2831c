"""TRPO: conjugate gradient against a direct solve, the trust-region scaling, a line search that respects
the KL bound (on its own and inside real updates), and learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.trpo import backtracking_line_search, conjugate_gradient, trust_region_step
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


def _fisher(dim: int = 6) -> torch.Tensor:
    """A small symmetric positive-definite matrix shaped like a Fisher matrix: E[J^T J] + damping."""
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(20, dim, generator=gen, dtype=torch.float64)
    return jac.T @ jac / 20 + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_conjugate_gradient_matches_a_direct_solve():
    fisher = _fisher()
    b = torch.arange(1.0, 7.0, dtype=torch.float64)
    x = conjugate_gradient(lambda v: fisher @ v, b, max_steps=6)  # exact after dim steps
    torch.testing.assert_close(x, torch.linalg.solve(fisher, b), rtol=1e-9, atol=1e-9)
    partial = conjugate_gradient(lambda v: fisher @ v, b, max_steps=2)
    assert torch.linalg.norm(fisher @ partial - b) < torch.linalg.norm(b)  # fewer steps: a partial answer


def test_trust_region_step_fills_the_quadratic_kl_model():
    fisher = _fisher()
    x = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    step = trust_region_step(x, fisher @ x, max_kl=0.01)
    assert float(0.5 * step @ fisher @ step) == pytest.approx(0.01, rel=1e-9)
    torch.testing.assert_close(step / step.norm(), x / x.norm())  # same direction


def test_line_search_backtracks_until_the_kl_bound_holds():
    tried = []

    def evaluate(coef):  # KL grows as coef^2; the surrogate improves with any positive step
        tried.append(coef)
        return coef, 0.05 * coef ** 2

    coef, tries = backtracking_line_search(evaluate, max_kl=0.01, shrink=0.8, max_iter=10)
    assert tries == 5 and coef == pytest.approx(0.8 ** 4)  # 1, .8, .64, .512 exceed the bound; .4096 fits
    assert 0.05 * coef ** 2 <= 0.01 < 0.05 * (coef / 0.8) ** 2
    assert tried == pytest.approx([0.8 ** k for k in range(5)])


def test_line_search_rejects_a_step_that_never_improves():
    assert backtracking_line_search(lambda c: (-c, 0.0), max_kl=0.01, shrink=0.5, max_iter=4) == (0.0, 4)


def test_every_update_stays_inside_the_trust_region():
    spec = load_spec(EXPERIMENTS / "cartpole_trpo.yaml", {"budget.env_steps": 8192, "hparams.n_critic_updates": 2})
    trainer = registry.get("trpo").trainer(spec, 0, "cpu")
    logs = []
    while not trainer.done:
        logs.append(trainer.train_iteration())
    target = spec.hparams["target_kl"]
    assert all(m["trpo/kl"] <= target * (1 + 1e-6) for m in logs), [m["trpo/kl"] for m in logs]
    assert all(m["trpo/step_coef"] > 0 for m in logs), "the line search rejected every step"
    assert all(m["trpo/surrogate_improvement"] > 0 for m in logs)


@pytest.mark.slow
def test_trpo_learns_cartpole():
    # Half the shipped budget; measured 500 on seed 0 at 50k steps here (random: about 22).
    spec = load_spec(EXPERIMENTS / "cartpole_trpo.yaml", {"budget.env_steps": 50_000})
    trainer = registry.get("trpo").trainer(spec, 0, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    assert trainer.evaluate()["eval/return_mean"] >= 200


def test_fisher_vector_product_is_the_kl_hessian():
    """The double-backpropagation product the trainer uses equals the explicit Hessian of the mean KL
    between a softmax policy and its frozen copy, applied to a vector."""
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def mean_kl(w):
        old = torch.distributions.Categorical(logits=obs @ weight.detach())
        return torch.distributions.kl_divergence(old, torch.distributions.Categorical(logits=obs @ w)).mean()

    v = torch.randn(12, generator=gen, dtype=torch.float64)
    kl_grad = torch.autograd.grad(mean_kl(weight), weight, create_graph=True)[0].reshape(-1)
    fvp = torch.autograd.grad(kl_grad @ v, weight)[0].reshape(-1)
    hessian = torch.autograd.functional.hessian(lambda w: mean_kl(w.reshape(3, 4)), weight.detach().reshape(-1))
    torch.testing.assert_close(fvp, hessian @ v)
    assert np.all(np.linalg.eigvalsh(hessian.numpy()) > -1e-10)  # positive semi-definite, as a Fisher matrix
