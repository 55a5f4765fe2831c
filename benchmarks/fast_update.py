"""PPO's, DQN's, A2C's or REINFORCE's training CPU on CartPole-v1 (the shipped spec: `cartpole_ppo.yaml`
100k steps, `cartpole_dqn.yaml` 50k, `cartpole_a2c.yaml` and `cartpole_reinforce.yaml` 100k by default; one
torch thread as a trial actor has), in one process, without Ray, with and without the two kernels: the
hand-written backward pass (`algorithms/rl/fastmlp.py`) and CartPole stepped as arrays (`rollout/classic.py`).
Each side trains the same seeds; the rounds alternate the sides.

    python benchmarks/fast_update.py [--algo ppo|dqn|a2c|reinforce] [--seeds 0,1,2] [--steps N]

Prints one JSON line per side: CPU seconds per seed (median), and each seed's final 20-episode evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.a2c import A2CTrainer
from labfleet.algorithms.rl.dqn import DQNTrainer
from labfleet.algorithms.rl.ppo import PPOTrainer
from labfleet.algorithms.rl.reinforce import ReinforceTrainer
from labfleet.rollout import classic
from labfleet.spec.loading import load_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SIDES = {"autograd, gymnasium envs": (False, False), "autograd, array envs": (False, True),
         "hand-written backward, array envs": (True, True)}


ALGOS = {"ppo": ("cartpole_ppo.yaml", PPOTrainer, 100_000), "dqn": ("cartpole_dqn.yaml", DQNTrainer, 50_000),
         "a2c": ("cartpole_a2c.yaml", A2CTrainer, 100_000),
         "reinforce": ("cartpole_reinforce.yaml", ReinforceTrainer, 100_000)}


def train(algo: str, seed: int, steps: int, fast: bool, arrays: bool) -> tuple[float, float]:
    file, trainer_class, _ = ALGOS[algo]
    spec = load_spec(EXPERIMENTS / file, {"budget.env_steps": steps})
    with mock.patch.object(classic, "fast_vector_env", classic.fast_vector_env if arrays else lambda *a: None), \
            mock.patch.object(trainer_class, "fast_update", fast):
        trainer = registry.get(algo).trainer(spec, seed, "cpu")
        start = time.process_time()
        while trainer.env_steps < steps:
            trainer.train_iteration()
        seconds = time.process_time() - start
        return seconds, float(trainer.evaluate()["eval/return_mean"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", choices=sorted(ALGOS), default="ppo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="default: 50k for DQN, else 100k")
    args = parser.parse_args()
    args.steps = args.steps or ALGOS[args.algo][2]
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    returns: dict[str, list[float]] = {side: [] for side in SIDES}
    for seed in seeds:
        for side, (fast, arrays) in SIDES.items():
            seconds, ret = train(args.algo, seed, args.steps, fast, arrays)
            cpu[side].append(seconds)
            returns[side].append(ret)
    base = statistics.median(cpu["autograd, gymnasium envs"])
    for side in SIDES:
        med = statistics.median(cpu[side])
        print(json.dumps({"side": side, "cpu_s_median": round(med, 2), "cpu_s": [round(c, 2) for c in cpu[side]],
                          "speedup": round(base / med, 2), "steps_per_cpu_s": round(args.steps / med),
                          "eval_returns": returns[side]}))


if __name__ == "__main__":
    main()
