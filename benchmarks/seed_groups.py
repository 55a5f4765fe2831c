"""The update of seeds trained together (`resources.seeds_per_actor`), in one process, without Ray: CPU
seconds of N seeds' iterations as one batched group, beside the same seeds trained alone in turn. One torch
thread, as a trial actor with one CPU has.

    python benchmarks/seed_groups.py [--algorithms ppo,a2c,reinforce,dqn,ddpg] [--seeds 5] [--rounds 3]

Each algorithm trains its shipped spec (CartPole, DDPG on Pendulum) for a fixed number of environment steps;
the rounds alternate the two sides. Prints one JSON line per algorithm: the median CPU seconds of each
side and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from labfleet.algorithms import registry
from labfleet.algorithms.seedgroup import build_group
from labfleet.spec.loading import load_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SPECS = {  # spec file, overrides: a few thousand steps with updates in them
    "ppo": ("cartpole_ppo.yaml", {"budget.env_steps": 8192}),
    "a2c": ("cartpole_a2c.yaml", {"budget.env_steps": 8000}),
    "reinforce": ("cartpole_reinforce.yaml", {"budget.env_steps": 8192}),
    "dqn": ("cartpole_dqn.yaml", {"budget.env_steps": 3000, "hparams.learning_starts": 1000}),
    "ddpg": ("pendulum_ddpg.yaml", {"budget.env_steps": 600, "hparams.learning_starts": 200}),
}


def together(algorithm: str, seeds: int) -> float:
    name, overrides = SPECS[algorithm]
    spec = load_spec(EXPERIMENTS / name, overrides)
    info = registry.get(algorithm)
    group = build_group(algorithm, {seed: info.trainer(spec, seed, "cpu") for seed in range(seeds)})
    assert group.batched, algorithm
    start = time.process_time()
    while group.live():
        group.train_iteration()
    group.sync()
    return time.process_time() - start


def alone(algorithm: str, seeds: int) -> float:
    name, overrides = SPECS[algorithm]
    spec = load_spec(EXPERIMENTS / name, overrides)
    info = registry.get(algorithm)
    trainers = [info.trainer(spec, seed, "cpu") for seed in range(seeds)]
    start = time.process_time()
    for trainer in trainers:
        while not trainer.done:
            trainer.train_iteration()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default="ppo,a2c,reinforce,dqn,ddpg")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for algorithm in args.algorithms.split(","):
        batched, sequential = [], []
        for _ in range(args.rounds):
            batched.append(together(algorithm, args.seeds))
            sequential.append(alone(algorithm, args.seeds))
        b, s = statistics.median(batched), statistics.median(sequential)
        print(json.dumps({"algorithm": algorithm, "seeds": args.seeds, "batched_cpu_s": round(b, 3),
                          "alone_cpu_s": round(s, 3), "speedup": round(s / b, 2),
                          "batched_all": [round(v, 3) for v in batched]}), flush=True)


if __name__ == "__main__":
    main()
