"""Evolution strategies: seconds per iteration with W = 0, 1, 2 perturbation workers.

    python benchmarks/es_scaling.py [--workers 0,1,2] [--warmup 15] [--iterations 5]

CartPole with the shipped `cartpole_es.yaml` (population 64) on a local Ray instance. Every W sees the
same iterations (the worker count changes speed, not results), so after the same warm-up the episodes
are equally long and the timings compare.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import ray

from labfleet.algorithms import registry
from labfleet.spec.loading import load_spec

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    ray.init(address="local", num_cpus=max(counts) + 1, include_dashboard=False, logging_level=logging.ERROR)
    print("| workers | s / iteration | env steps / s |\n|---|---|---|")
    for workers in counts:
        spec = load_spec(REPO / "experiments" / "cartpole_es.yaml", {
            "resources.rollout_workers": workers, "resources.cpus_per_worker": 1, "budget.env_steps": 10 ** 9})
        trainer = registry.get("es").trainer(spec, 0, "cpu")
        for _ in range(args.warmup):
            trainer.train_iteration()
        start, steps = time.perf_counter(), trainer.env_steps
        for _ in range(args.iterations):
            trainer.train_iteration()
        elapsed = time.perf_counter() - start
        print(f"| {workers} | {elapsed / args.iterations:.2f} | {(trainer.env_steps - steps) / elapsed:,.0f} |",
              flush=True)
        trainer.close()


if __name__ == "__main__":
    main()
