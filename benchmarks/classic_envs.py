"""CartPole stepped as arrays (`rollout/classic.py`) against gymnasium's synchronous vector env, in one
process: CPU microseconds per vector step of 8 environments (random actions, same-step autoreset). What it
changes in a whole PPO training is `benchmarks/fast_update.py`'s second row.

    python benchmarks/classic_envs.py [--rounds 5] [--steps 20000]

The rounds alternate the two sides. Prints one JSON line: the median of each side and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import numpy as np

from labfleet.rollout import classic


def vector_steps(env: gym.vector.VectorEnv, steps: int) -> float:
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, (steps, env.num_envs))
    env.reset(seed=list(range(env.num_envs)))
    start = time.process_time()
    for t in range(steps):
        env.step(actions[t])
    return (time.process_time() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args()
    step_us: dict[str, list[float]] = {"arrays": [], "gymnasium": []}
    for _ in range(args.rounds):
        step_us["arrays"].append(vector_steps(classic.CartPoleVector(8), args.steps))
        step_us["gymnasium"].append(vector_steps(gym.make_vec(
            "CartPole-v1", num_envs=8, vectorization_mode="sync", disable_env_checker=True,
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}), args.steps))
    med = {k: statistics.median(v) for k, v in step_us.items()}
    print(json.dumps({"measure": "us per vector step (8 envs, CPU)", **med,
                      "ratio": med["gymnasium"] / med["arrays"]}))


if __name__ == "__main__":
    main()
