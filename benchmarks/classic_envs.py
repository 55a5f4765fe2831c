"""CartPole stepped as arrays (`rollout/classic.py`) against gymnasium's synchronous vector env, in one
process, without Ray: microseconds per vector step of 8 environments, and the CPU seconds of a whole PPO
training (the shipped `cartpole_ppo.yaml`, one torch thread, as a trial actor has) on each.

    python benchmarks/classic_envs.py [--rounds 5] [--ppo-steps 100000]

The rounds alternate the two sides. Prints one JSON line per measure: the median of each side and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import gymnasium as gym
import numpy as np
import torch

from labfleet.algorithms import registry
from labfleet.rollout import classic
from labfleet.spec.loading import load_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def vector_steps(env: gym.vector.VectorEnv, steps: int) -> float:
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, (steps, env.num_envs))
    env.reset(seed=list(range(env.num_envs)))
    start = time.process_time()
    for t in range(steps):
        env.step(actions[t])
    return (time.process_time() - start) / steps * 1e6


def ppo(steps: int, arrays: bool) -> tuple[float, float]:
    spec = load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {"budget.env_steps": steps})
    with mock.patch.object(classic, "fast_vector_env", classic.fast_vector_env if arrays else lambda *a: None):
        trainer = registry.get("ppo").trainer(spec, 0, "cpu")
        start = time.process_time()
        while trainer.env_steps < steps:
            trainer.train_iteration()
        seconds = time.process_time() - start
        returns = trainer.evaluate()["eval/return_mean"]
    return seconds, float(returns)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ppo-steps", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    step_us: dict[str, list[float]] = {"arrays": [], "gymnasium": []}
    for _ in range(args.rounds):
        step_us["arrays"].append(vector_steps(classic.CartPoleVector(8), 20_000))
        step_us["gymnasium"].append(vector_steps(gym.make_vec(
            "CartPole-v1", num_envs=8, vectorization_mode="sync", disable_env_checker=True,
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}), 20_000))
    med = {k: statistics.median(v) for k, v in step_us.items()}
    print(json.dumps({"measure": "us per vector step (8 envs, CPU)", **med,
                      "ratio": med["gymnasium"] / med["arrays"]}))
    cpu: dict[str, list[float]] = {"arrays": [], "gymnasium": []}
    returns: dict[str, list[float]] = {"arrays": [], "gymnasium": []}
    for _ in range(max(1, args.rounds // 2)):
        for side in ("arrays", "gymnasium"):
            seconds, ret = ppo(args.ppo_steps, side == "arrays")
            cpu[side].append(seconds)
            returns[side].append(ret)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(json.dumps({"measure": f"PPO CartPole {args.ppo_steps} steps, training CPU s", **med,
                      "ratio": med["gymnasium"] / med["arrays"], "eval_returns": returns}))


if __name__ == "__main__":
    main()
