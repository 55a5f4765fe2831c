"""Why the GAN misses grid25's bar, and what the Fourier-feature discriminator changes (docs/benchmarks.md,
"grid-gan").

    python benchmarks/gan_grid.py probe
    python benchmarks/gan_grid.py train --seeds 7000 --every 5000 [--set hparams.d_fourier_features=64 ...]
    python benchmarks/gan_grid.py train --seeds 7100 --raw-weight 1 --set hparams.d_fourier_features=64 ...

`probe` trains only grid_gan.yaml's discriminator, as its trainer builds it (pac 4, 3 x 200, Adam 2e-4), to
tell grid25's points from the same points blurred by Gaussian noise of std 0.3, as a blurry generator's
samples would be, and prints its loss (2 ln 2 = 1.386: it cannot tell them apart), with raw coordinates
and with 64 random Fourier features. `train` trains `experiments/grid_gan.yaml` (with the overrides)
in-process, one thread per seed, two seeds at a time, and prints modes covered and the high-quality
fraction every `--every` iterations (with `drs`, of the samples rejection sampling keeps, then of the
generator's own G(z)). `--raw-weight w` trains a second discriminator on raw coordinates
beside the Fourier one (the spec's own, with its own Adam) and adds w times its non-saturating loss to the
generator's (an experiment of this script's own; the trainer has no such option).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch
from torch import nn

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "grid_gan.yaml"


def probe(fourier: int, steps: int = 3000, blur: float = 0.3) -> list[float]:
    """The discriminator of grid_gan.yaml (with `fourier` Fourier features), trained alone with Adam at the
    spec's rate and betas: its loss every 1000 steps."""
    from labfleet.algorithms import registry
    from labfleet.spec.loading import load_spec

    trainer = registry.get("gan").trainer(load_spec(SPEC, {"hparams.d_fourier_features": fourier}), 0, "cpu")
    torch.manual_seed(0)
    points, hp = trainer.train_x, trainer.hp
    optimizer = torch.optim.Adam(trainer.discriminator.parameters(), lr=hp.initial_learning_rate,
                                 betas=hp.optimizer.betas)
    softplus, losses = nn.functional.softplus, []
    for step in range(1, steps + 1):
        real = points[torch.randint(len(points), (hp.batch_size,))]
        blurred = points[torch.randint(len(points), (hp.batch_size,))] + blur * torch.randn(hp.batch_size, 2)
        loss = softplus(-trainer.judge(real)).mean() + softplus(trainer.judge(blurred)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 1000 == 0:
            losses.append(round(loss.item(), 3))
    return losses


def two_discriminators(raw_weight: float) -> type:
    """The GAN trainer with a second, raw-coordinate discriminator beside its Fourier one."""
    from labfleet.algorithms.generative.base import mlp
    from labfleet.algorithms.generative.gan import GANTrainer
    from labfleet.algorithms.optim import ScheduledOptimizer

    class TwoDiscriminators(GANTrainer):
        def build(self) -> None:
            super().build()
            hp = self.hp
            if hp.d_steps != 1 or hp.gp_weight:
                raise ValueError("--raw-weight trains one step of each discriminator without a gradient penalty")
            self.d_raw = mlp([2 * hp.pac, *(hp.d_hidden or hp.hidden), 1], activation=lambda: nn.LeakyReLU(0.2))
            self.models["discriminator_raw"] = self.d_raw
            d_hp = hp.model_copy(update={"learning_rate": hp.d_learning_rate}) if hp.d_learning_rate else hp
            self.optimizers["discriminator_raw"] = ScheduledOptimizer(self.d_raw.parameters(), d_hp)

        def step(self, batch: torch.Tensor) -> dict[str, float]:
            softplus, fraction = nn.functional.softplus, self.budget_fraction()
            real = self.scaled(batch)
            if self.fourier is not None and self.fourier.ramp is not None:
                self.fourier.progress.fill_(fraction)
            fake = self.generate_scaled(len(real), self.torch_gen).detach()

            def packed(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(-1, self.hp.pac * 2)

            d_loss = softplus(-self.judge(real)).mean() + softplus(self.judge(fake)).mean()
            self.optimizers["discriminator"].step(d_loss, fraction)
            raw_loss = softplus(-self.d_raw(packed(real))).mean() + softplus(self.d_raw(packed(fake))).mean()
            self.optimizers["discriminator_raw"].step(raw_loss, fraction)
            generated = self.generate_scaled(len(real), self.torch_gen)
            g_loss = (softplus(-self.judge(generated)).mean()
                      + raw_weight * softplus(-self.d_raw(packed(generated))).mean())
            judges = [*self.discriminator.parameters(), *self.d_raw.parameters()]
            for p in judges:
                p.requires_grad_(False)
            try:
                self.optimizers["generator"].step(g_loss, fraction)
            finally:
                for p in judges:
                    p.requires_grad_(True)
            return {"loss/generator": float(g_loss.detach()), "loss/discriminator": float(d_loss.detach()),
                    "loss/discriminator_raw": float(raw_loss.detach())}

    return TwoDiscriminators


def train(args: tuple[dict, int, int, float]) -> tuple[int, float, list[tuple[int, float, float]]]:
    overrides, seed, every, raw_weight = args
    torch.set_num_threads(1)
    from labfleet.algorithms import registry
    from labfleet.algorithms.generative.metrics import mixture_metrics
    from labfleet.spec.loading import load_spec

    trainer_class = two_discriminators(raw_weight) if raw_weight else registry.get("gan").trainer
    trainer = trainer_class(load_spec(SPEC, overrides), seed, "cpu")
    start, curve = time.perf_counter(), []
    while not trainer.done:
        trainer.train_iteration()
        if trainer.steps % every == 0 or trainer.done:
            result = trainer.evaluate()
            point = (trainer.steps, result["eval/modes_covered"], round(result["eval/high_quality_frac"], 3))
            if trainer.hp.drs:  # and the generator's own samples, G(z) without the rejection step
                with torch.no_grad():
                    own = mixture_metrics(trainer.generate_scaled(2500, torch.Generator().manual_seed(12)).numpy(),
                                          trainer.data.modes, trainer.data.sigma)
                point += (own["eval/modes_covered"], round(own["eval/high_quality_frac"], 3))
            curve.append(point)
    return seed, round(time.perf_counter() - start), curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["probe", "train"])
    parser.add_argument("--seeds", default="7000")
    parser.add_argument("--every", type=int, default=5000)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=YAML", help="a spec override")
    parser.add_argument("--raw-weight", type=float, default=0.0,
                        help="train a second, raw-coordinate discriminator; its weight in the generator's loss")
    args = parser.parse_args()
    if args.mode == "probe":
        for fourier in (0, 64):
            print(f"discriminator on {'raw coordinates' if not fourier else f'{fourier} Fourier features'}: "
                  f"loss at steps 1000/2000/3000 = {probe(fourier)}", flush=True)
        return
    from labfleet.spec.loading import parse_set_options

    overrides = parse_set_options(args.set)  # as `labfleet run --set` reads them
    jobs = [(overrides, int(seed), args.every, args.raw_weight) for seed in args.seeds.split(",")]
    with mp.get_context("spawn").Pool(2) as pool:
        for seed, seconds, curve in pool.imap_unordered(train, jobs):
            key = "steps, modes, high-quality fraction (with drs: then the generator's own)"
            print(json.dumps({"overrides": overrides, "raw_weight": args.raw_weight, "seed": seed, "seconds": seconds,
                              key: curve}), flush=True)


if __name__ == "__main__":
    main()
