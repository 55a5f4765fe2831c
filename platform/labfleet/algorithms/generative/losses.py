"""The generative models' losses, defined once (the trainers in `gan.py` and `vae.py` call these; the tests
check them on hand-computed numbers). Logits are the discriminator's pre-sigmoid outputs: D(x) = sigmoid(l),
so log D = -softplus(-l) and log(1 - D) = -softplus(l)."""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn.functional import relu, softplus

GANLoss = Literal["non_saturating", "saturating", "hinge"]


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: GANLoss) -> torch.Tensor:
    """-V(G, D) = -E[log D(x)] - E[log(1 - D(G(z)))] (Goodfellow et al. 2014; the same for the saturating
    and non-saturating generators), or the hinge loss E[max(0, 1 - l(x))] + E[max(0, 1 + l(G(z)))]."""
    if loss == "hinge":
        return relu(1 - real_logits).mean() + relu(1 + fake_logits).mean()
    return softplus(-real_logits).mean() + softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, loss: GANLoss) -> torch.Tensor:
    """Non-saturating -E[log D(G(z))]; saturating (minimax) E[log(1 - D(G(z)))]; hinge -E[l(G(z))]."""
    if loss == "hinge":
        return -fake_logits.mean()
    if loss == "non_saturating":
        return softplus(-fake_logits).mean()
    return -softplus(fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor, weight: float) -> torch.Tensor:
    """(weight / 2) E[||grad_x l(x)||^2] on real data (Mescheder et al. 2018), differentiable (for the
    discriminator's step); `real` must require grad and `real_logits` come from it."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return 0.5 * weight * grad.pow(2).flatten(1).sum(1).mean()


def negative_elbo(log_likelihood: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """-E[log p(x|z) - beta KL(q(z|x) || p(z))] over the batch, from each example's reconstruction
    log-likelihood and KL term (beta 1: the negative ELBO; other values: the beta-VAE objective)."""
    return -(log_likelihood - beta * kl).mean()
