"""Estimators and sample-quality metrics shared by the generative models.

Densities (nats): diagonal Gaussians and the Binomial(n, p) pixel likelihood of count images. Sample
quality on Gaussian mixtures follows PacGAN (Lin et al. 2018) / VEEGAN (Srivastava et al. 2017): a sample
is high quality when it lies within 3 sigma of its nearest mode, a mode is covered when at least one
high-quality sample is nearest to it, and `mode_kl` is KL(mode histogram of the high-quality samples ||
uniform). On digits, a small classifier trained on the train split gives the Frechet distance between its
penultimate features of samples and of test images (`fd_digits`, as FID does with Inception), and the
share of samples it classifies with probability >= 0.9. On 8-bit image datasets with class labels, a
feature classifier trained once on the whole train split (and cached) gives the Frechet distance (`fd`), the
kernel inception distance (`kid`) and improved precision and recall (`precision`, `recall`) between samples
and held-out images in its features.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labfleet import metrics as M

LOG_2PI = math.log(2 * math.pi)


def _wide(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """bfloat16 / float16 tensors (from autocast) as float32; float32 and float64 as they are. Densities and
    losses are summed over hundreds of dimensions, where bf16's 8 bits of mantissa would show."""
    return tuple(t.float() if t.is_floating_point() and t.element_size() < 4 else t for t in tensors)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, summed over the last dimension."""
    mu, logvar = _wide(mu, logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
                 ) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag(exp(logvar))), summed over the last dimension (in float32 at least)."""
    x, mu, logvar = _wide(x, mu, logvar)
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) / logvar.exp()).sum(-1)


def binomial_log_prob(x: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
    """log Binomial(x; n, sigmoid(logits)) per example: summed over every non-batch dimension. x holds
    counts 0..n. The log binomial coefficient is included, so the value is a proper log-likelihood (in float32
    at least)."""
    x, logits = _wide(x, logits)
    log_coef = math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
    log_p = x * nn.functional.logsigmoid(logits) + (n - x) * nn.functional.logsigmoid(-logits) + log_coef
    return log_p.flatten(1).sum(1)


def discretized_logistic_log_prob(x: torch.Tensor, logits: torch.Tensor, log_scale: torch.Tensor, n: int
                                  ) -> torch.Tensor:
    """log P(x) per example, summed over every non-batch dimension, of counts x in 0..n under a logistic of
    location sigmoid(logits) and scale exp(log_scale) on [0, 1], discretised into n + 1 bins of width 1/n
    centred on k/n, the two end bins reaching to -inf and +inf (Salimans et al. 2017). Computed in float32 at
    least (also under bf16 autocast)."""
    x, logits, log_scale = _wide(x, logits, log_scale)
    log_scale = log_scale.clamp(min=-9.0)
    centred = x / n - torch.sigmoid(logits)
    inverse = torch.exp(-log_scale)
    upper, lower = inverse * (centred + 0.5 / n), inverse * (centred - 0.5 / n)
    log_cdf_upper = upper - nn.functional.softplus(upper)  # log sigmoid(upper): the first bin
    log_survival_lower = -nn.functional.softplus(lower)  # log (1 - sigmoid(lower)): the last bin
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    middle = inverse * centred  # where the mass underflows: the density at the centre times the bin width
    log_density = middle - log_scale - 2 * nn.functional.softplus(middle) - math.log(n)
    log_mid = torch.where(mass > 1e-5, torch.log(mass.clamp(min=1e-12)), log_density)
    log_p = torch.where(x <= 0, log_cdf_upper, torch.where(x >= n, log_survival_lower, log_mid))
    return log_p.flatten(1).sum(1)


def pixel_histogram_nll(train: np.ndarray, test: np.ndarray, n: int) -> float:
    """Mean test NLL (nats per example) of independent pixels, each a categorical over 0..n fitted on the
    train split with add-one smoothing: the best independent-pixel model of count images."""
    train_flat = train.reshape(len(train), -1).astype(np.int64)
    test_flat = test.reshape(len(test), -1).astype(np.int64)
    dims = train_flat.shape[1]
    offsets = np.arange(dims) * (n + 1)
    counts = np.bincount((train_flat + offsets).ravel(), minlength=dims * (n + 1)).reshape(dims, n + 1) + 1.0
    log_p = np.log(counts / counts.sum(1, keepdims=True))
    return float(-log_p.ravel()[test_flat + offsets].sum(1).mean())


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
    return {M.GAN_MODES_COVERED: float(covered), M.GAN_HIGH_QUALITY_FRAC: float(high_quality.mean()),
            M.GAN_MODE_KL: mode_kl}


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
    return {M.FD_DIGITS: frechet_distance(fs.numpy().astype(np.float64), fr.numpy().astype(np.float64)),
            M.CONFIDENT_FRAC: float(confident.float().mean())}


# --- sample quality on 8-bit image datasets --------------------------------------------------------------
FEATURE_WIDTHS = (256, 128)
FEATURE_STEPS = 1500
FEATURE_BATCH = 256


class FeatureClassifier(nn.Module):
    """An MLP classifier of images scaled to [0, 1]; `features` is its last hidden layer (128 units), the
    space in which the image metrics compare samples with held-out images, as FID does in Inception's."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        a, b = FEATURE_WIDTHS
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(dim, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU())
        self.head = nn.Linear(b, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _cache_dir() -> Path:
    root = os.environ.get("LABFLEET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "labfleet")
    return Path(root) / "feature-classifiers"


def _fingerprint(train: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(repr((train.shape, str(train.dtype), FEATURE_WIDTHS, FEATURE_STEPS, FEATURE_BATCH)).encode())
    digest.update(np.ascontiguousarray(train).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()[:24]


_CLASSIFIERS: dict[str, tuple[FeatureClassifier, float]] = {}


def feature_classifier(train: np.ndarray, labels: np.ndarray, test: np.ndarray | None = None,
                       test_labels: np.ndarray | None = None) -> tuple[FeatureClassifier, float]:
    """The feature classifier of a dataset, trained once on its whole train split (8-bit images and class
    labels): fixed seed, Adam, FEATURE_STEPS minibatches of FEATURE_BATCH. It is kept in this process and on
    disk (`$LABFLEET_CACHE`, default ~/.cache/labfleet, keyed by a hash of the training data, written
    atomically, read with weights_only), so every trial of a sweep compares samples in the same features.
    Returns it with its test accuracy (NaN without test labels)."""
    key = _fingerprint(train, labels)
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    classes = int(labels.max()) + 1
    dim = int(np.prod(train.shape[1:]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FeatureClassifier(dim, classes)
    file = _cache_dir() / f"{key}.pt"
    loaded = False
    if file.is_file():
        with contextlib.suppress(Exception):  # a damaged or foreign cache file: train again and replace it
            model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
            loaded = True
    if not loaded:
        _train_classifier(model, train, labels)
        with contextlib.suppress(OSError):  # a read-only home: keep it in this process only
            file.parent.mkdir(parents=True, exist_ok=True)
            partial = file.with_name(f"{file.name}.{os.getpid()}.part")
            torch.save(model.state_dict(), partial)
            os.replace(partial, file)
    model.eval()
    accuracy = math.nan
    if test is not None and test_labels is not None:
        with torch.no_grad():
            x = torch.as_tensor(test, dtype=torch.float32) / 255.0
            accuracy = float((model(x).argmax(1) == torch.as_tensor(test_labels)).float().mean())
    _CLASSIFIERS[key] = (model, accuracy)
    return model, accuracy


def _train_classifier(model: FeatureClassifier, train: np.ndarray, labels: np.ndarray) -> None:
    x, y = torch.as_tensor(train), torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.enable_grad():  # also when first needed inside an evaluation's no_grad block
        for _ in range(FEATURE_STEPS):
            index = torch.randint(len(x), (FEATURE_BATCH,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index].float() / 255.0), y[index]).backward()
            optimizer.step()


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 10, size: int = 1000,
                              seed: int = 0) -> float:
    """KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
    averaged over `subsets` random subsets of `size` points of each set (all points when fewer)."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
    around its points reaching their k-th nearest neighbour; precision is the share of generated points
    inside the real manifold, recall the share of real points inside the generated one."""
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the 1st is the point itself

    def inside(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= radius[None, :]).any(1).double().mean())

    return inside(f, r, radii(r)), inside(r, f, radii(f))


def image_metrics(samples: torch.Tensor, reference: torch.Tensor, classifier: FeatureClassifier
                  ) -> dict[str, float]:
    """FD, KID, precision and recall between samples and reference images (both (n, C, H, W) in [0, 1]) in
    the classifier's features."""
    with torch.no_grad():
        fs = classifier.features(samples.float().cpu()).double().numpy()
        fr = classifier.features(reference.float().cpu()).double().numpy()
    precision, recall = precision_recall(fr, fs)
    return {M.FD: frechet_distance(fs, fr), M.KID: kernel_inception_distance(fs, fr),
            M.PRECISION: precision, M.RECALL: recall}
