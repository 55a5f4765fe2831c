"""The generative losses (`algorithms/generative/losses.py`) on numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from labfleet.algorithms.generative import losses

LN2 = math.log(2)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_the_discriminator_at_chance_pays_two_ln_two():
    zero = torch.zeros(4)
    assert float(losses.discriminator_loss(zero, zero, "non_saturating")) == pytest.approx(2 * LN2)
    assert float(losses.discriminator_loss(zero, zero, "saturating")) == pytest.approx(2 * LN2)


def test_the_discriminator_loss_by_hand():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 3.0])
    # -log D(x) = softplus(-l); -log(1 - D(G(z))) = softplus(l)
    expected = (softplus(-2) + softplus(0)) / 2 + (softplus(-1) + softplus(3)) / 2
    assert float(losses.discriminator_loss(real, fake, "non_saturating")) == pytest.approx(expected)
    # hinge: mean(max(0, 1 - [2, 0])) + mean(max(0, 1 + [-1, 3])) = 0.5 + 2
    assert float(losses.discriminator_loss(real, fake, "hinge")) == pytest.approx(2.5)


def test_the_generator_losses_by_hand():
    fake = torch.tensor([1.0, -2.0])
    assert float(losses.generator_loss(fake, "non_saturating")) == pytest.approx((softplus(-1) + softplus(2)) / 2)
    assert float(losses.generator_loss(fake, "saturating")) == pytest.approx(-(softplus(1) + softplus(-2)) / 2)
    assert float(losses.generator_loss(fake, "hinge")) == pytest.approx(0.5)


def test_the_r1_penalty_of_a_linear_critic_is_half_its_squared_slope():
    w = torch.tensor([3.0, 4.0], requires_grad=True)  # the critic l(x) = w . x: grad_x l = w
    real = torch.randn(5, 2).requires_grad_(True)
    penalty = losses.r1_penalty(real @ w, real, weight=0.1)
    assert float(penalty) == pytest.approx(0.5 * 0.1 * 25.0)
    penalty.backward()  # it trains the critic: d/dw (0.05 ||w||^2) = 0.1 w
    torch.testing.assert_close(w.grad, torch.tensor([0.3, 0.4]))


def test_the_negative_elbo_by_hand():
    recon, kl = torch.tensor([-10.0, -20.0]), torch.tensor([1.0, 3.0])
    assert float(losses.negative_elbo(recon, kl)) == pytest.approx((11 + 23) / 2)
    assert float(losses.negative_elbo(recon, kl, beta=0.5)) == pytest.approx((10.5 + 21.5) / 2)
