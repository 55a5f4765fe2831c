"""Variational autoencoder (Kingma & Welling 2014), beta-VAE (Higgins et al. 2017), the IWAE bound (Burda et
al. 2016) at evaluation, and a two-level hierarchical VAE.

One level: q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), and
    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),
with z = mu + sigma * eps (the reparameterisation trick) and the KL in closed form. Training minimises
-(E_q[log p(x|z)] - beta * KL), one sample of z per example.

Two levels (`hierarchical: true`): q(z1|x) q(z2|z1), p(z2) = N(0, I), p(z1|z2) = N(mu(z2), sigma^2(z2)),
p(x|z1). The ELBO is E_q[log p(x|z1)] - E_q[KL(q(z2|z1) || p(z2))] - E_q[log q(z1|x) - log p(z1|z2)]: the
z2 term in closed form, the z1 term a one-sample Monte Carlo estimate (z2 depends on the sampled z1).

Likelihood (the choice matters for the numbers): count images use a proper discrete likelihood of the data
as it is, with no dequantisation or binarisation, so nats are comparable with any other model of the same
counts. Digits (intensities 0..16) use a Binomial with n = the number of levels per pixel, p = sigmoid(decoder
logits). 8-bit images use a discretised logistic (Salimans et al. 2017) whose location and scale the decoder
gives per pixel: a Binomial's variance is tied to its mean, which for 256 levels makes it a poor model (about
90 bits per dimension on Fashion-MNIST against about 4). `likelihood: bernoulli` models binarised images
instead, the classic MNIST benchmark: each training minibatch is binarised afresh (pixel on with probability
intensity / 255, from the trainer's noise generator), the validation and test splits once, with a fixed seed,
so that every run is scored on the same binary images. Points (ring8, grid25)
use a diagonal Gaussian with a learned per-dimension variance.

Evaluation on the test split, nats per example: `eval/neg_elbo` (`elbo_samples` of z per example),
`eval/recon_nll` (-E_q[log p(x|z)]), `eval/kl` (the KL terms), `eval/baseline_nll` (an independent-pixel
model fitted on the train split: under the same likelihood, or for the logistic the best one there is, a
256-level histogram per pixel), `eval/iwae_nll` (-log (1/K) sum_k
p(x, z_k) / q(z_k|x), K = `iwae_samples`, when K > 1), on image datasets `eval/bits_per_dim` (neg_elbo /
(dimensions * ln 2)), and of decoded samples: on digits `eval/fd_digits` and `eval/confident_frac`, on 8-bit
image datasets with labels `eval/fd`, `eval/kid`, `eval/precision` and `eval/recall` (see the GAN). The
validation metric for early stopping is `valid/neg_elbo`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn

from labfleet import metrics as M
from labfleet.algorithms.generative import losses
from labfleet.algorithms.generative import metrics as GM
from labfleet.algorithms.generative.base import (
    CheapDecoder,
    ConvDecoder,
    ConvEncoder,
    GenerativeHParams,
    GenerativeTrainer,
    ResNetEncoder,
    latent_path,
    mlp,
)
from labfleet.algorithms.generative.plots import image_grid_png, points_png
from labfleet.algorithms.optim import ScheduledOptimizer
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.data import datasets
from labfleet.seeding import derive_seed

EVAL_SAMPLES = 10
EVAL_CHUNK = 1000  # examples per evaluation forward pass
QUALITY_SAMPLES = 2500  # decoded samples for the image metrics


class VAEHParams(GenerativeHParams):
    architecture: Literal["mlp", "conv", "resnet"] = Field(  # type: ignore[assignment]  # (the VAE adds resnet)
        "mlp", description="mlp; conv for image datasets; or resnet: residual blocks in the encoder and a cheap "
        "upsampling decoder.")
    learning_rate: float | str = 1e-3
    latent_dim: PositiveInt = Field(16, description="Size of z (of z1 when hierarchical).")
    beta: float = Field(1.0, gt=0, description="Weight of the KL term in training (beta-VAE); 1: the ELBO.")
    iwae_samples: PositiveInt = Field(1, description="K importance samples for eval/iwae_nll; 1: not computed.")
    hierarchical: bool = Field(False, description="Two latent levels, z1 given z2.")
    latent_dim2: PositiveInt = Field(8, description="Size of z2 (hierarchical).")
    likelihood: Literal["auto", "binomial", "logistic", "bernoulli"] = Field(
        "auto", description="p(x|z) of count images: binomial (n = the levels), logistic (discretised, a mean "
        "and a scale per pixel), or bernoulli (images binarised: afresh each step in training, once and fixed "
        "for evaluation); auto: binomial for digits, logistic for 8-bit images. Points: a Gaussian.")
    elbo_samples: PositiveInt = Field(EVAL_SAMPLES, description="Samples of z per example in the evaluation's "
                                      "ELBO estimates (valid/neg_elbo, eval/neg_elbo).")


class VAEModel(nn.Module):
    """`decode` gives (n, outputs * C, H, W) for images ((n, outputs * D) for points): one output per pixel
    (binomial logits, Gaussian means), or two (the discretised logistic's mean logits, then its log-scales)."""

    def __init__(self, hp: VAEHParams, shape: tuple[int, ...], gaussian_output: bool, outputs: int = 1):
        super().__init__()
        dim = int(np.prod(shape))
        self.shape = (shape[0] * outputs, *shape[1:])
        z = hp.latent_dim
        if hp.architecture == "conv":
            self.encoder: nn.Module = ConvEncoder(shape, hp.channels, 2 * z, hp.dropout)
            self.decoder: nn.Module = ConvDecoder(z, self.shape, hp.channels)
        elif hp.architecture == "resnet":
            self.encoder = ResNetEncoder(shape, hp.channels, 2 * z)
            self.decoder = CheapDecoder(z, self.shape, hp.channels)
        else:
            self.encoder = nn.Sequential(nn.Flatten(), mlp([dim, *hp.hidden, 2 * z], dropout=hp.dropout))
            self.decoder = mlp([z, *reversed(hp.hidden), dim * outputs], dropout=hp.dropout)
        self.hierarchical = hp.hierarchical
        if hp.hierarchical:
            z2, width = hp.latent_dim2, hp.hidden[-1]
            self.encoder2 = mlp([z, width, 2 * z2])  # q(z2|z1)
            self.prior1 = mlp([z2, width, 2 * z])  # p(z1|z2)
        self.log_scale = nn.Parameter(torch.zeros(dim)) if gaussian_output else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(-1, *self.shape)


class VAETrainer(GenerativeTrainer):
    hparams_model: ClassVar = VAEHParams
    hp: VAEHParams

    def build(self) -> None:
        self.validation_name = M.VALID_NEG_ELBO
        self.gaussian = self.data.levels is None
        self.likelihood = "gaussian" if self.gaussian else self.hp.likelihood
        if self.likelihood == "auto":
            self.likelihood = "logistic" if self.data.levels == 255 else "binomial"
        outputs = 2 if self.likelihood == "logistic" else 1
        # what the likelihood scores in evaluation: the held-out images, or one fixed binarisation of them
        self.valid_target, self.test_target = self.valid_x, self.test_x
        if self.likelihood == "bernoulli":
            fixed = torch.Generator(device=self.device).manual_seed(derive_seed(datasets.SPLIT_SEED, "binarise"))
            self.valid_target, self.test_target = self.binarise(self.valid_x, fixed), self.binarise(self.test_x, fixed)
        self.model = VAEModel(self.hp, self.data.shape, self.gaussian, outputs).to(self.device)
        self.models = {"vae": self.model}
        self.optimizers = {"vae": ScheduledOptimizer(self.model.parameters(), self.hp)}
        self.baseline_nll = self._baseline_nll()

    # --- the model's densities ----------------------------------------------------------------------
    def log_likelihood(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.gaussian:
            assert self.model.log_scale is not None
            logvar = 2 * self.model.log_scale.expand_as(out.flatten(1))
            return GM.gaussian_log_prob(x.flatten(1), out.flatten(1), logvar)
        assert self.data.levels is not None
        if self.likelihood == "logistic":
            logits, log_scale = out.chunk(2, dim=1)
            return GM.discretized_logistic_log_prob(x, logits, log_scale, self.data.levels)
        if self.likelihood == "bernoulli":  # x is 0 or `levels`: a Binomial(1, p) of x / levels
            return GM.binomial_log_prob(x / self.data.levels, out, 1)
        return GM.binomial_log_prob(x, out, self.data.levels)

    def binarise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each pixel `levels` with probability intensity / levels, else 0 (dynamic binarisation)."""
        assert self.data.levels is not None
        draws = torch.rand(x.shape, generator=generator, device=x.device)
        return (draws < x / self.data.levels).to(x.dtype) * self.data.levels

    def decoded_mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's output as counts (images: the likelihood's mean, or the logistic's location) or
        points."""
        if self.data.levels is None:
            return out
        logits = out.chunk(2, dim=1)[0] if self.likelihood == "logistic" else out
        return torch.sigmoid(logits) * self.data.levels

    def terms(self, x: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per example: (log p(x|z), KL terms, log p(x, z) - log q(z|x)) for one sample of z."""
        m = self.model
        mu, logvar = m.encode(self.scaled(x))
        z1 = GM.reparameterize(mu, logvar, generator)
        recon = self.log_likelihood(x, m.decode(z1))
        if not m.hierarchical:
            kl = GM.kl_standard_normal(mu, logvar)
            log_weight = recon + GM.gaussian_log_prob(z1, torch.zeros_like(z1), torch.zeros_like(z1)) \
                - GM.gaussian_log_prob(z1, mu, logvar)
            return recon, kl, log_weight
        mu2, logvar2 = m.encoder2(z1).chunk(2, dim=-1)
        logvar2 = logvar2.clamp(-12.0, 8.0)
        z2 = GM.reparameterize(mu2, logvar2, generator)
        mu_p, logvar_p = m.prior1(z2).chunk(2, dim=-1)
        logvar_p = logvar_p.clamp(-12.0, 8.0)
        log_q1, log_p1 = GM.gaussian_log_prob(z1, mu, logvar), GM.gaussian_log_prob(z1, mu_p, logvar_p)
        kl = GM.kl_standard_normal(mu2, logvar2) + (log_q1 - log_p1)
        log_weight = recon + log_p1 + GM.gaussian_log_prob(z2, torch.zeros_like(z2), torch.zeros_like(z2)) \
            - log_q1 - GM.gaussian_log_prob(z2, mu2, logvar2)
        return recon, kl, log_weight

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        if self.likelihood == "bernoulli":
            batch = self.binarise(batch, self.torch_gen)
        recon, kl, _ = self.terms(batch, self.torch_gen)
        loss = losses.negative_elbo(recon, kl, self.hp.beta)
        norm = self.optimizers["vae"].step_tensor(loss, self.budget_fraction())
        neg_elbo = losses.negative_elbo(recon, kl).detach()
        values = torch.stack([loss.detach(), neg_elbo, kl.mean().detach(), norm]).tolist()
        return {**dict(zip((M.LOSS_VAE, M.TRAIN_NEG_ELBO, M.TRAIN_KL, M.GRAD_NORM), values, strict=True)),
                M.LEARNING_RATE: self.optimizers["vae"].learning_rate}  # one host sync a step

    # --- evaluation ----------------------------------------------------------------------------------
    def _estimates(self, x: torch.Tensor, samples: int, seed: int) -> tuple[float, float, float]:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        recon = torch.zeros((), device=self.device, dtype=torch.float64)
        kl = torch.zeros_like(recon)
        for _ in range(samples):
            for chunk in x.split(EVAL_CHUNK):  # bounded memory on a 10k-image test split
                r, k, _ = self.terms(chunk, gen)
                recon += r.double().sum()
                kl += k.double().sum()
        recon_mean, kl_mean = float(recon) / (samples * len(x)), float(kl) / (samples * len(x))
        return -recon_mean, kl_mean, kl_mean - recon_mean

    def validation_metric(self) -> float:
        return self._estimates(self.valid_target, self.hp.elbo_samples, 1)[2]

    def iwae_nll(self, x: torch.Tensor, k: int, seed: int = 2) -> float:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        total = 0.0
        for chunk in x.split(EVAL_CHUNK):
            weights = torch.stack([self.terms(chunk, gen)[2] for _ in range(k)])  # (K, n)
            total += float(-(torch.logsumexp(weights, 0) - math.log(k)).double().sum())
        return total / len(x)

    def test_metrics(self) -> dict[str, float]:
        recon_nll, kl, neg_elbo = self._estimates(self.test_target, self.hp.elbo_samples, 3)
        out = {M.VAE_NEG_ELBO: neg_elbo, M.VAE_RECON_NLL: recon_nll, M.VAE_KL: kl,
               M.VAE_BASELINE_NLL: self.baseline_nll}
        if self.hp.iwae_samples > 1:
            out[M.VAE_IWAE_NLL] = self.iwae_nll(self.test_target, self.hp.iwae_samples)
        if self.data.is_image:  # nats per example over dimensions and ln 2: bits per dimension
            out[M.VAE_BITS_PER_DIM] = neg_elbo / (math.prod(self.data.shape) * math.log(2))
        if self.data.name == "digits":
            samples = self.generate(1000, torch.Generator(device=self.device).manual_seed(4))
            out.update(GM.digits_metrics(samples / 16.0, self.test_x / 16.0))
        elif self.has_image_metrics:
            samples = self.generate(QUALITY_SAMPLES, torch.Generator(device=self.device).manual_seed(4))
            out.update(self.image_quality(samples, self.test_x))
        elif self.data.modes is not None:
            assert self.data.sigma is not None
            samples = self.generate(2500, torch.Generator(device=self.device).manual_seed(4))
            out.update(GM.mixture_metrics(samples.cpu().numpy(), self.data.modes, self.data.sigma))
        return out

    def _baseline_nll(self) -> float:
        """Test NLL of independent pixels (or coordinates) fitted by maximum likelihood on the train split."""
        train, test = self.train_x.flatten(1).double(), self.test_target.flatten(1).double()
        if self.gaussian:
            mean, var = train.mean(0), train.var(0, unbiased=False).clamp_min(1e-12)
            return float(-GM.gaussian_log_prob(test, mean, var.log()).mean())
        assert self.data.levels is not None
        if self.likelihood == "logistic":  # the best independent-pixel model of 8-bit counts: a histogram each
            return GM.pixel_histogram_nll(self.data.train, self.data.test, self.data.levels)
        # Binomial(n, p_j) pixels with p_j = mean intensity / levels; n = 1 on binarised images
        p = (train.mean(0) / self.data.levels).clamp(1e-6, 1 - 1e-6)
        logits = (p.log() - (-p).log1p()).expand_as(test)
        n, x = (1, test / self.data.levels) if self.likelihood == "bernoulli" else (self.data.levels, test)
        return float(-GM.binomial_log_prob(x, logits, n).mean())

    # --- samples -------------------------------------------------------------------------------------
    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Decoded means of z ~ p(z): expected counts for images, mu for points."""
        m = self.model
        if m.hierarchical:
            z2 = torch.randn(n, self.hp.latent_dim2, generator=generator, device=self.device)
            mu_p, logvar_p = m.prior1(z2).chunk(2, dim=-1)
            z = GM.reparameterize(mu_p, logvar_p.clamp(-12.0, 8.0), generator)
        else:
            z = torch.randn(n, self.hp.latent_dim, generator=generator, device=self.device)
        return self.decoded_mean(m.decode(z))

    def sample_images(self) -> dict[str, bytes]:
        gen = torch.Generator(device=self.device).manual_seed(5)
        samples = self.generate(64, gen)
        if not self.data.is_image:
            assert self.data.modes is not None
            return {"samples": points_png(samples.cpu().numpy(), self.data.modes, f"VAE samples, step {self.steps}")}
        assert self.data.levels is not None
        x = self.test_target[:32]
        mu, _ = self.model.encode(self.scaled(x))
        recon = self.decoded_mean(self.model.decode(mu))
        pairs = torch.stack([x, recon], 1).reshape(-1, *self.data.shape)  # original, reconstruction, ...
        levels = float(self.data.levels)
        # each row: the decoded path between the latent means of two test images, in 8 equal steps
        ends, _ = self.model.encode(self.scaled(self.test_target[:16]))
        between = self.decoded_mean(self.model.decode(latent_path(ends[:8], ends[8:16])))
        return {"samples": image_grid_png(samples.cpu().numpy() / levels, f"VAE samples, step {self.steps}"),
                "reconstructions": image_grid_png(pairs.cpu().numpy() / levels,
                                                  f"test images and reconstructions, step {self.steps}"),
                "interpolations": image_grid_png(between.cpu().numpy() / levels,
                                                 f"between two test images' latents, step {self.steps}")}


register(AlgorithmInfo(
    name="vae", kind="generative", hparams=VAEHParams, trainer=VAETrainer,
    summary="Variational autoencoder (beta-VAE, IWAE bound, two-level hierarchical option)",
    rollout_workers=False, primary_metric=M.VAE_NEG_ELBO, budget_units=("epochs", "iterations"),
    eval_metrics=(M.VAE_NEG_ELBO, M.VAE_RECON_NLL, M.VAE_KL, M.VAE_BASELINE_NLL, M.VAE_IWAE_NLL, M.FD_DIGITS,
                  M.CONFIDENT_FRAC, M.GAN_MODES_COVERED, M.GAN_HIGH_QUALITY_FRAC, M.GAN_MODE_KL,
                  M.VAE_BITS_PER_DIM, M.FD, M.KID, M.PRECISION, M.RECALL),
))
