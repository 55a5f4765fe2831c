"""Generative adversarial network (Goodfellow et al. 2014), with PacGAN packing (Lin et al. 2018) and an
optional R1 gradient penalty (Mescheder et al. 2018).

The value function is V(G, D) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]. Each iteration takes `d_steps`
discriminator steps on -V (binary cross-entropy with logits: real 1, generated 0) and one generator step:
by default the non-saturating loss -E_z[log D(G(z))] (same fixed point, strong gradients early on), or,
with `loss: saturating`, E_z[log(1 - D(G(z)))] as in the minimax game. With `loss: hinge` the discriminator
minimises E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] and the generator -E[D(G(z))] (Lim and Ye 2017).
With `pac: m` the discriminator judges m samples at once (concatenated), which penalises a generator that
drops modes. `gp_weight: g` adds
g/2 * E_x ||grad_x D(x)||^2 on real data to the discriminator's loss. On points, `d_fourier_features: k` gives
the discriminator random Fourier features of each point (`FourierFeatures`), so that it can see how sharp
the generated modes are.

With `drs: true` (architecture mlp; made for points), samples are drawn by discriminator rejection sampling
(Azadi et al. 2019): a critic of its own (unpacked, 64 random Fourier features, 3 x 200) learns beside the
GAN, one step per iteration on the iteration's real points against its last generated ones, and never feeds
the generator a gradient, so the generator and discriminator train exactly as without it. Its logit l(x)
estimates log p_data(x) / p_g(x); a generated point is kept with probability min(1, exp(l(x) - M)), M the
`drs_quantile` quantile of l over the first round of candidates. Every sample the trainer gives out
(evaluations, the validation metric, sample plots, `labfleet enjoy`) is drawn this way.

Evaluation (2500 samples from fixed noise): on ring8/grid25 `eval/modes_covered`, `eval/high_quality_frac`
and `eval/mode_kl`; on digits `eval/fd_digits` and `eval/confident_frac`; on 8-bit image datasets
(Fashion-MNIST, ...) `eval/fd`, `eval/kid`, `eval/precision` and `eval/recall` against the test split in a
feature classifier's features (`metrics.image_metrics`). The validation metric for early stopping is
`valid/mode_score` = mode_kl + (1 - high_quality_frac) on fresh samples (mixtures), `valid/fd_digits`
(digits) or `valid/fd` (images) against the validation split; lower is better.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch import nn

from labfleet import metrics as M
from labfleet.algorithms.generative import losses
from labfleet.algorithms.generative import metrics as GM
from labfleet.algorithms.generative.base import (
    ConvDecoder,
    ConvEncoder,
    GenerativeHParams,
    GenerativeTrainer,
    latent_path,
    mlp,
)
from labfleet.algorithms.generative.plots import image_grid_png, points_png
from labfleet.algorithms.optim import ConstantSchedule, OptimizerConfig, ScheduledOptimizer
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.sizes import Width

EVAL_SAMPLES = 2500
DRS_FEATURES = 64  # the rejection critic's Fourier features (scale 1), as the discriminator probe found enough
DRS_CANDIDATES = 40  # candidates drawn per round for each sample asked for
DRS_ROUNDS = 50  # at most this many rounds (at least 1 - drs_quantile of the first round is kept for sure)


def _gan_optimizer() -> OptimizerConfig:
    return OptimizerConfig(type="adam", betas=(0.5, 0.999))


class FourierFeatures(nn.Module):
    """(n, pac * dim) -> (n, pac * (dim + 2 * count)): each of the pac points x, followed by sin and cos of
    2 pi x B, with fixed frequencies B ~ N(0, scale^2) of shape (dim, count). An MLP on raw coordinates learns
    high frequencies slowly (spectral bias): on grid25 such a discriminator cannot tell the mixture from the
    same points blurred by 0.3 in 3000 steps, so the generator is never pushed to sharpen its samples; on
    these features it can within 1000. The raw coordinates stay, so that the discriminator still sees
    where a point is (sin and cos alone look alike far away).

    With a `ramp` (start, end) in fractions of the budget, the features come in coarse to fine, as in BARF
    (Lin et al. 2021): the frequencies are sorted by norm, and frequency k is weighted by
    (1 - cos(pi * clip(a - k, 0, 1))) / 2 with a = count * (progress - start) / (end - start), so that before
    `start` the discriminator sees the raw coordinates only and after `end` every feature at full weight.
    `progress` (a buffer, so that a checkpoint keeps it) is set by the trainer.
    """

    def __init__(self, dim: int, count: int, scale: float, ramp: tuple[float, float] | None = None):
        super().__init__()
        self.dim = dim
        self.ramp = ramp
        frequencies = torch.randn(dim, count) * scale
        if ramp is not None:
            frequencies = frequencies[:, frequencies.norm(dim=0).argsort()]
        self.frequencies: torch.Tensor
        self.register_buffer("frequencies", frequencies)
        if ramp is not None:
            self.progress: torch.Tensor
            self.register_buffer("progress", torch.zeros(()))

    def weights(self) -> torch.Tensor:
        """Each frequency's weight in [0, 1] at the current progress (all 1 without a ramp)."""
        count = self.frequencies.shape[1]
        if self.ramp is None:
            return torch.ones(count, device=self.frequencies.device)
        start, end = self.ramp
        a = count * ((self.progress - start) / (end - start)).clamp(0.0, 1.0)
        k = torch.arange(count, device=self.frequencies.device)
        return (1 - torch.cos(math.pi * (a - k).clamp(0.0, 1.0))) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        points = x.reshape(len(x), -1, self.dim)
        angles = 2 * math.pi * (points @ self.frequencies)
        if self.ramp is None:
            return torch.cat([points, angles.sin(), angles.cos()], -1).flatten(1)
        w = self.weights()
        return torch.cat([points, w * angles.sin(), w * angles.cos()], -1).flatten(1)


class GANHParams(GenerativeHParams):
    learning_rate: float | str = Field(2e-4, description="The generator's (and, by default, the discriminator's).")
    optimizer: OptimizerConfig = Field(default_factory=_gan_optimizer)
    d_learning_rate: float | None = Field(None, gt=0, description="The discriminator's; null: learning_rate.")
    latent_dim: PositiveInt = Field(16, description="Size of the generator's noise z ~ N(0, I).")
    d_hidden: list[Width] | None = Field(None, description="Discriminator MLP widths; null: hidden.")
    loss: Literal["non_saturating", "saturating", "hinge"] = "non_saturating"
    batch_norm: bool = Field(False, description="BatchNorm in the conv generator (DCGAN).")
    spectral_norm: bool = Field(False, description="Spectral normalisation of the conv discriminator's layers.")
    ema: float | None = Field(None, gt=0, lt=1, description="Decay of an exponential moving average of the "
                              "generator's weights, which every sample is drawn from (e.g. 0.999); null: off.")
    gp_weight: float = Field(0.0, ge=0, description="R1 gradient penalty on real data; 0: off.")
    pac: PositiveInt = Field(1, description="Samples the discriminator judges together (PacGAN); 1: plain GAN.")
    d_steps: PositiveInt = Field(1, description="Discriminator steps per generator step.")
    d_fourier_features: NonNegativeInt = Field(0, description="Random Fourier features of each point at the "
                                               "discriminator's input (mlp; Tancik et al. 2020): this many "
                                               "frequencies, sin and cos each; 0: raw coordinates.")
    d_fourier_scale: PositiveFloat = Field(1.0, description="Standard deviation of those frequencies, in cycles "
                                           "per unit of the networks' input.")
    d_fourier_ramp: tuple[float, float] | None = Field(
        None, description="[start, end] fractions of the budget over which the Fourier features come in, lowest "
        "frequencies first (coarse to fine); null: all of them from the start.")
    drs: bool = Field(False, description="Draw samples by discriminator rejection sampling (Azadi et al. 2019) "
                      "with a Fourier-feature critic trained beside the GAN (architecture mlp); false: G(z) as is.")
    drs_quantile: float = Field(0.99, gt=0, le=1, description="Points whose critic logit is above this quantile "
                                "of the candidates' are kept for sure, the rest with probability exp(l - M); "
                                "1: the exact rule with M the candidates' maximum (fewest, sharpest samples).")
    drs_learning_rate: PositiveFloat = Field(1e-3, description="The rejection critic's Adam learning rate "
                                             "(constant).")

    @model_validator(mode="after")
    def _mlp_only(self) -> GANHParams:
        if self.d_fourier_features and self.architecture != "mlp":
            raise ValueError("d_fourier_features needs architecture mlp (points); set it to 0 for conv")
        if (self.batch_norm or self.spectral_norm) and self.architecture != "conv":
            raise ValueError("batch_norm and spectral_norm need architecture conv")
        if self.drs and self.architecture != "mlp":
            raise ValueError("drs needs architecture mlp (points): its critic reads Fourier features of points")
        if self.d_fourier_ramp is not None:
            start, end = self.d_fourier_ramp
            if not self.d_fourier_features:
                raise ValueError("d_fourier_ramp needs d_fourier_features > 0")
            if not 0 <= start < end <= 1:
                raise ValueError(f"d_fourier_ramp must be [start, end] with 0 <= start < end <= 1, got {[start, end]}")
        return self


class GANTrainer(GenerativeTrainer):
    hparams_model: ClassVar = GANHParams
    hp: GANHParams

    def build(self) -> None:
        shape, hp = self.data.shape, self.hp
        dim = int(np.prod(shape))
        if self.data.name == "digits":
            self.validation_name = M.VALID_FD_DIGITS
        elif self.data.is_image:
            if not self.has_image_metrics:
                raise ValueError(f"the GAN on {self.data.name} needs class labels (y_train) to train the feature "
                                 "classifier its sample-quality metrics use")
            self.validation_name = M.VALID_FD
        else:
            self.validation_name = M.VALID_MODE_SCORE
        if self.hp.batch_size // self.world % hp.pac:
            raise ValueError(f"batch_size per worker ({self.hp.batch_size // self.world}) must be a multiple of pac")
        self.fourier: FourierFeatures | None = None
        if hp.architecture == "conv":
            self.generator: nn.Module = ConvDecoder(hp.latent_dim, shape, hp.channels, hp.batch_norm)
            packed = (shape[0] * hp.pac, *shape[1:])
            self.discriminator: nn.Module = ConvEncoder(packed, hp.channels, 1, hp.dropout, hp.spectral_norm)
        else:
            self.generator = mlp([hp.latent_dim, *hp.hidden, dim])
            d_hidden = hp.d_hidden or hp.hidden
            d_in = dim * hp.pac if not hp.d_fourier_features else (dim + 2 * hp.d_fourier_features) * hp.pac
            body = mlp([d_in, *d_hidden, 1], activation=lambda: nn.LeakyReLU(0.2), dropout=hp.dropout)
            self.fourier = FourierFeatures(dim, hp.d_fourier_features, hp.d_fourier_scale, hp.d_fourier_ramp) \
                if hp.d_fourier_features else None
            self.discriminator = body if self.fourier is None else nn.Sequential(self.fourier, body)
        self.generator.to(self.device)
        self.discriminator.to(self.device)
        self.models = {"generator": self.generator, "discriminator": self.discriminator}
        d_hp = hp.model_copy(update={"learning_rate": hp.d_learning_rate}) if hp.d_learning_rate else hp
        self.optimizers = {"generator": ScheduledOptimizer(self.generator.parameters(), hp),
                           "discriminator": ScheduledOptimizer(self.discriminator.parameters(), d_hp)}
        self.average: nn.Module | None = None
        if hp.ema is not None:  # an average of the generator's weights (and BatchNorm statistics)
            self.average = copy.deepcopy(self.generator).requires_grad_(False)
            self.models["generator_ema"] = self.average
        self.critic: nn.Module | None = None
        if hp.drs:  # built last, so that the generator and discriminator start as they do without it
            self.critic = nn.Sequential(
                FourierFeatures(dim, DRS_FEATURES, 1.0),
                mlp([dim + 2 * DRS_FEATURES, 200, 200, 200, 1], activation=lambda: nn.LeakyReLU(0.2))).to(self.device)
            self.models["critic"] = self.critic
            c_hp = hp.model_copy(update={"learning_rate": hp.drs_learning_rate, "lr_schedule": ConstantSchedule(),
                                         "max_grad_norm": None})
            self.optimizers["critic"] = ScheduledOptimizer(self.critic.parameters(), c_hp)

    # --- the networks ----------------------------------------------------------------------------------
    def sampling_network(self) -> nn.Module:
        """The generator samples are drawn from: its moving average where there is one (`ema`)."""
        return self.average if self.average is not None else self.generator

    def generate_scaled(self, n: int, generator: torch.Generator | None, averaged: bool = False) -> torch.Tensor:
        """G(z) in the discriminator's input scale: [0, 1] images, or points; from the averaged generator
        when asked and there is one."""
        z = torch.randn(n, self.hp.latent_dim, generator=generator, device=self.device)
        network = self.sampling_network() if averaged else self.generator
        out = network(z).reshape(n, *self.data.shape)
        return torch.sigmoid(out) if self.data.levels else out

    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.critic is not None:
            out = self.rejection_sample(n, generator)
        elif self.data.is_image:  # in chunks: bounded memory for conv generators
            out = torch.cat([self.generate_scaled(len(chunk), generator, averaged=True)
                             for chunk in torch.arange(n).split(1000)])
        else:
            out = self.generate_scaled(n, generator, averaged=True)
        return out * self.data.levels if self.data.levels else out

    @torch.no_grad()
    def rejection_sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """n points of G(z) kept by the critic: each with probability min(1, exp(l - M)), M the
        `drs_quantile` quantile of the first round's logits (rounds of DRS_CANDIDATES * n candidates)."""
        assert self.critic is not None
        kept: list[torch.Tensor] = []
        ceiling = None
        for _ in range(DRS_ROUNDS):
            candidates = self.generate_scaled(DRS_CANDIDATES * n, generator)
            logits = torch.cat([self.critic(chunk).squeeze(-1) for chunk in candidates.split(20_000)])
            if ceiling is None:
                q = self.hp.drs_quantile
                ceiling = logits.max() if q >= 1 else torch.quantile(logits[:100_000], q)
            u = torch.rand(len(logits), generator=generator, device=self.device)
            accepted = candidates[u < torch.exp(logits - ceiling)]
            kept.append(accepted)
            if sum(len(k) for k in kept) >= n:
                break
        out = torch.cat(kept)
        if len(out) < n:
            raise RuntimeError(f"rejection sampling kept {len(out)} of the {n} points asked for in {DRS_ROUNDS} rounds")
        return out[:n]

    def judge(self, x: torch.Tensor) -> torch.Tensor:
        """Discriminator logits, one per pack of `pac` samples."""
        pac = self.hp.pac
        if self.hp.architecture == "conv":
            return self.discriminator(x.reshape(-1, pac * x.shape[1], *x.shape[2:])).squeeze(-1)
        return self.discriminator(x.reshape(-1, pac * int(np.prod(x.shape[1:])))).squeeze(-1)

    # --- one iteration --------------------------------------------------------------------------------
    def step(self, batch: torch.Tensor) -> dict[str, float]:
        real = self.scaled(batch)
        if self.fourier is not None and self.fourier.ramp is not None:
            self.fourier.progress.fill_(self.budget_fraction())
        d_loss = torch.zeros(())
        for i in range(self.hp.d_steps):
            if i:
                real = self.scaled(self.next_batch())
            fake = self.generate_scaled(len(real), self.torch_gen).detach()
            real_in = real.requires_grad_(True) if self.hp.gp_weight else real
            real_logits = self.judge(real_in)
            d_loss = losses.discriminator_loss(real_logits, self.judge(fake), self.hp.loss)
            if self.hp.gp_weight:
                d_loss = d_loss + losses.r1_penalty(real_logits, real_in, self.hp.gp_weight)
            self.optimizers["discriminator"].step_tensor(d_loss, self.budget_fraction())
        g_loss = losses.generator_loss(self.judge(self.generate_scaled(len(real), self.torch_gen)), self.hp.loss)
        for p in self.discriminator.parameters():
            p.requires_grad_(False)  # the generator's step leaves the discriminator's gradients alone
        try:
            g_norm = self.optimizers["generator"].step_tensor(g_loss, self.budget_fraction())
        finally:
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
        if self.average is not None:
            self._update_average()
        names, values = [M.LOSS_GENERATOR, M.LOSS_DISCRIMINATOR, M.GRAD_NORM], [g_loss, d_loss, g_norm]
        if self.critic is not None:  # the rejection critic: the same real points against the last fakes
            c_loss = losses.discriminator_loss(self.critic(real.detach()), self.critic(fake), "non_saturating")
            self.optimizers["critic"].step_tensor(c_loss, self.budget_fraction())
            names.append(M.LOSS_CRITIC)
            values.append(c_loss)
        read = torch.stack([v.detach().float() for v in values]).tolist()  # one host sync a step
        rate = self.optimizers["generator"].learning_rate
        return {**dict(zip(names, read, strict=True)), M.LEARNING_RATE: rate}

    @torch.no_grad()
    def _update_average(self) -> None:
        assert self.average is not None and self.hp.ema is not None
        decay = self.hp.ema
        for kept, current in zip(self.average.parameters(), self.generator.parameters(), strict=True):
            kept.lerp_(current, 1 - decay)
        for buffer, now in zip(self.average.buffers(), self.generator.buffers(), strict=True):
            buffer.copy_(now)  # BatchNorm's running statistics and counts: the generator's own

    # --- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _quality(self, seed: int, reference: torch.Tensor) -> dict[str, float]:
        samples = self.generate(EVAL_SAMPLES, torch.Generator(device=self.device).manual_seed(seed))
        if self.data.modes is not None:
            assert self.data.sigma is not None
            return GM.mixture_metrics(samples.cpu().numpy(), self.data.modes, self.data.sigma)
        if self.data.name == "digits":
            return GM.digits_metrics(samples / 16.0, reference / 16.0)
        return self.image_quality(samples, reference)

    def validation_metric(self) -> float:
        quality = self._quality(11, self.valid_x)
        if M.FD_DIGITS in quality:
            return quality[M.FD_DIGITS]
        if M.FD in quality:
            return quality[M.FD]
        if M.GAN_MODE_KL in quality:
            return quality[M.GAN_MODE_KL] + 1.0 - quality[M.GAN_HIGH_QUALITY_FRAC]
        raise ValueError(f"no validation metric for the GAN on {self.data.name}")

    def test_metrics(self) -> dict[str, float]:
        return self._quality(12, self.test_x)

    def _interpolations(self) -> torch.Tensor:
        """Each row: the (averaged) generator along the straight path between two fixed latents, 8 steps."""
        gen = torch.Generator(device=self.device).manual_seed(6)
        ends = torch.randn(16, self.hp.latent_dim, generator=gen, device=self.device)
        path = latent_path(ends[:8], ends[8:])
        return torch.sigmoid(self.sampling_network()(path).reshape(len(path), *self.data.shape))

    def sample_images(self) -> dict[str, bytes]:
        samples = self.generate(64 if self.data.is_image else 1000, torch.Generator(device=self.device).manual_seed(5))
        if self.data.is_image:
            assert self.data.levels is not None
            return {"samples": image_grid_png(samples.cpu().numpy() / self.data.levels,
                                              f"GAN samples, step {self.steps}"),
                    "interpolations": image_grid_png(self._interpolations().cpu().numpy(),
                                                     f"GAN between fixed latents, step {self.steps}")}
        assert self.data.modes is not None
        return {"samples": points_png(samples.cpu().numpy(), self.data.modes, f"GAN samples, step {self.steps}")}


register(AlgorithmInfo(
    name="gan", kind="generative", hparams=GANHParams, trainer=GANTrainer,
    summary="GAN (non-saturating or minimax loss, PacGAN packing, R1 gradient penalty)",
    rollout_workers=False, primary_metric=M.GAN_MODES_COVERED, budget_units=("iterations", "epochs"),
    needs_image_labels=True,
    dataset_metrics={"digits": M.FD_DIGITS, "fashion_mnist": M.FD, "mnist": M.FD, "images": M.FD},
    eval_metrics=(M.GAN_MODES_COVERED, M.GAN_HIGH_QUALITY_FRAC, M.GAN_MODE_KL, M.FD_DIGITS, M.CONFIDENT_FRAC,
                  M.FD, M.KID, M.PRECISION, M.RECALL),
))
