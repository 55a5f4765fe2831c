"""Fashion-MNIST: the shipped conv VAE and DCGAN against their references, three seeds, on the CPU.

    python benchmarks/fashion_mnist.py [--seeds 0,1,2] [--vae-epochs 5] [--gan-iterations 3000] [--limit N]

VAE: test bits per dimension against the independent-pixel baseline (a 256-level histogram per pixel).
DCGAN: FD and KID to the test split in the feature classifier's features, against the floor (the train
split's own distance to the test split, 2500 images) and two trivial generators fitted to the training
pixels (independent Gaussians; one full-covariance Gaussian). Also time per epoch / images per second.
Each seed trains in its own process (one torch thread each, two at a time on a 2-core machine), through the
trainers `labfleet run` uses, from the shipped specs with the budgets above.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def run_seed(algorithm: str, spec_file: str, overrides: dict[str, Any], seed: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    from labfleet.algorithms import registry
    from labfleet.spec.loading import load_spec

    spec = load_spec(spec_file, overrides)
    trainer = registry.get(algorithm).trainer(spec, seed, "cpu")
    started = time.perf_counter()
    while not trainer.done:
        trainer.train_iteration()
    seconds = time.perf_counter() - started
    result = trainer.evaluate()
    result["seconds"] = seconds
    result["images_per_s"] = trainer.steps * trainer.hp.batch_size / seconds
    result["s_per_epoch"] = seconds / (trainer.steps / trainer.steps_per_epoch)
    return result


def references(eval_limit: int) -> dict[str, dict[str, float]]:
    import torch

    from labfleet.algorithms.generative import metrics as GM
    from labfleet.data import datasets

    data = datasets.load("fashion_mnist", eval_limit=eval_limit)
    classifier, accuracy = GM.feature_classifier(data.train, data.labels["train"], data.test, data.labels["test"])
    test = torch.as_tensor(data.test).float() / 255
    rng = np.random.default_rng(0)
    pixels = data.train.reshape(len(data.train), -1).astype(np.float64)
    mean, std = pixels.mean(0), pixels.std(0)
    draws = {
        "train split (floor)": data.train[rng.choice(len(data.train), 2500, replace=False)].astype(np.float64),
        "independent Gaussians": np.clip(mean + std * rng.standard_normal((2500, pixels.shape[1])), 0, 255),
        "full-covariance Gaussian": np.clip(rng.multivariate_normal(mean, np.cov(pixels, rowvar=False), 2500,
                                                                    method="eigh"), 0, 255),
    }
    out = {name: GM.image_metrics(torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255, test,
                                  classifier) for name, x in draws.items()}
    out["classifier"] = {"test accuracy": accuracy}
    return out


def summary(results: list[dict[str, float]], key: str) -> str:
    values = [r[key] for r in results]
    return f"{np.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--vae-epochs", type=int, default=5)
    parser.add_argument("--gan-iterations", type=int, default=3000)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    kwargs = {"eval_limit": 5000, **({"limit": args.limit} if args.limit else {})}
    vae = (str(ROOT / "experiments/fashion_mnist_vae.yaml"),
           {"budget": {"epochs": args.vae_epochs}, "dataset_kwargs": kwargs})
    gan = (str(ROOT / "experiments/fashion_mnist_dcgan.yaml"),
           {"budget": {"iterations": args.gan_iterations}, "dataset_kwargs": kwargs})
    print(f"references (eval_limit {kwargs['eval_limit']}):", flush=True)
    for name, values in references(kwargs["eval_limit"]).items():
        print(f"  {name}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in values.items()), flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        vae_jobs = [pool.submit(run_seed, "vae", *vae, seed) for seed in seeds]
        gan_jobs = [pool.submit(run_seed, "gan", *gan, seed) for seed in seeds]
        vae_results = [job.result() for job in vae_jobs]
        gan_results = [job.result() for job in gan_jobs]
    baseline = vae_results[0]["eval/baseline_nll"] / (784 * math.log(2))
    print(f"\nVAE, {args.vae_epochs} epochs, seeds {args.seeds}: bits/dim {summary(vae_results, 'eval/bits_per_dim')}"
          f" against the pixel-histogram baseline {baseline:.3f}; neg_elbo {summary(vae_results, 'eval/neg_elbo')}"
          f" nats; fd {summary(vae_results, 'eval/fd')}; {summary(vae_results, 's_per_epoch')} s/epoch, "
          f"{summary(vae_results, 'images_per_s')} images/s")
    print(f"DCGAN, {args.gan_iterations} iterations: fd {summary(gan_results, 'eval/fd')}, kid "
          f"{summary(gan_results, 'eval/kid')}, precision {summary(gan_results, 'eval/precision')}, recall "
          f"{summary(gan_results, 'eval/recall')}; {summary(gan_results, 'images_per_s')} images/s")


if __name__ == "__main__":
    main()
