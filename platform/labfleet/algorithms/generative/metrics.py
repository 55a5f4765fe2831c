"""Estimators and sample-quality metrics shared by the generative models.

Densities (nats): diagonal Gaussians and the Binomial(n, p) pixel likelihood of count images. Sample
quality on Gaussian mixtures follows PacGAN (Lin et al. 2018) / VEEGAN (Srivastava et al. 2017): a sample
is high quality when it lies within 3 sigma of its nearest mode, a mode is covered when at least one
high-quality sample is nearest to it, and `mode_kl` is KL(mode histogram of the high-quality samples ||
uniform). On digits, a small classifier trained on the train split gives the Frechet distance between its
penultimate features of samples and of test images (`fd_digits`, as FID does with Inception), and the
share of samples it classifies with probability >= 0.9.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
                 ) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) / logvar.exp()).sum(-1)


def binomial_log_prob(x: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
    """log Binomial(x; n, sigmoid(logits)) per example: summed over every non-batch dimension. x holds
    counts 0..n. The log binomial coefficient is included, so the value is a proper log-likelihood."""
    log_coef = math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
    log_p = x * nn.functional.logsigmoid(logits) + (n - x) * nn.functional.logsigmoid(-logits) + log_coef
    return log_p.flatten(1).sum(1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient reaches mu and sigma."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def mixture_metrics(samples: np.ndarray, modes: np.ndarray, sigma: float) -> dict[str, float]:
    """modes_covered, high_quality_frac and mode_kl of samples from a model of a Gaussian mixture."""
    distances = np.linalg.norm(samples[:, None, :] - modes[None, :, :], axis=-1)
    nearest = distances.argmin(1)
    high_quality = distances[np.arange(len(samples)), nearest] <= 3 * sigma
    counts = np.bincount(nearest[high_quality], minlength=len(modes)).astype(np.float64)
    covered = int((counts > 0).sum())
    if counts.sum() > 0:
        p = counts / counts.sum()
        nonzero = p > 0
        mode_kl = float((p[nonzero] * np.log(p[nonzero] * len(modes))).sum())
    else:
        mode_kl = math.log(len(modes))  # no high-quality sample: as far from uniform as one mode alone
    return {"eval/modes_covered": float(covered), "eval/high_quality_frac": float(high_quality.mean()),
            "eval/mode_kl": mode_kl}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of S_a S_b (real and >= 0 for PSD
    # matrices; clipped against round-off), which avoids a matrix square root of a singular product.
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0.0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(eigenvalues).sum())


class DigitsClassifier(nn.Module):
    """64 -> 128 -> 64 -> 10 MLP on digits scaled to [0, 1]; `features` is the 64-unit penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@cache
def digits_classifier() -> tuple[DigitsClassifier, float]:
    """The reference classifier, trained once per process on the digits train split (fixed seed, full
    batch Adam, 300 steps); returns it with its test accuracy."""
    from labfleet.data.datasets import load_digits_dataset

    data = load_digits_dataset()
    x = torch.as_tensor(data.train / 16.0)
    y = torch.as_tensor(data.labels["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    with torch.enable_grad():  # also when first needed inside an evaluation's no_grad block
        for _ in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.as_tensor(data.test / 16.0)).argmax(1)
                          == torch.as_tensor(data.labels["test"])).float().mean())
    return model, accuracy


def digits_metrics(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """fd_digits between samples and reference images (both (n, 1, 8, 8) in [0, 1]) and the share of
    samples classified with probability >= 0.9."""
    model, _ = digits_classifier()
    with torch.no_grad():
        fs, fr = model.features(samples.float().cpu()), model.features(reference.float().cpu())
        confident = model.head(fs).softmax(1).max(1).values >= 0.9
    return {"eval/fd_digits": frechet_distance(fs.numpy().astype(np.float64), fr.numpy().astype(np.float64)),
            "eval/confident_frac": float(confident.float().mean())}
