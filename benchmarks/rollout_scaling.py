"""Env steps per second of a PPO trial with W = 0, 1, 2 Ray rollout workers, as the step cost grows.

    python benchmarks/rollout_scaling.py [--costs 0,0.05,0.2,1] [--steps 8192]

The environment is CartPole with a busy-wait of `step_cost_ms` per step (benchmarks/slow_env.py), so it
behaves like a CPU-bound simulator. Each configuration runs as the driver runs trials: a trial actor in a
placement group with one bundle per rollout worker (here 0.5 CPU each, so that W = 2 fits 2 cores).
Throughput counts every env step of the training iterations after a warm-up iteration (which includes
starting the workers).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only local Ray (see labfleet.cli)
import ray  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # slow_env, for this process and Ray's workers

from labfleet.orchestration.runner import trial_bundles  # noqa: E402
from labfleet.orchestration.trial import TrialWorker  # noqa: E402
from labfleet.spec.loading import load_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@ray.remote
class TimedTrial(TrialWorker):
    def timed_iterations(self, iterations: int) -> float:
        self.trainer.train_iteration()  # warm-up: starts the rollout workers
        start, steps = time.perf_counter(), self.trainer.env_steps
        for _ in range(iterations):
            self.trainer.train_iteration()
        return (self.trainer.env_steps - steps) / (time.perf_counter() - start)


def measure(cost_ms: float, workers: int, steps: int) -> float:
    spec = load_spec(REPO / "experiments" / "cartpole_ppo.yaml", {
        "env": "slow_env:SlowCartPole", "env_kwargs": {"step_cost_ms": cost_ms}, "hparams.n_envs": 8,
        "hparams.n_steps": 64, "hparams.n_epochs": 4, "budget.env_steps": 10 * steps,
        "resources.rollout_workers": workers, "resources.cpus_per_worker": 0.5})
    group = placement_group(trial_bundles(spec))
    ray.get(group.ready())
    trial = TimedTrial.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0)).remote(spec.model_dump(mode="json"), 0)
    try:
        return ray.get(trial.timed_iterations.remote(max(1, steps // 512)))
    finally:
        ray.kill(trial)
        remove_placement_group(group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", default="0,0.05,0.2,1")
    parser.add_argument("--steps", type=int, default=8192)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    print("| step cost (ms) | W = 0 steps/s | W = 1 steps/s | W = 2 steps/s | W = 2 / W = 0 |")
    print("|---|---|---|---|---|")
    for cost in (float(c) for c in args.costs.split(",")):
        sps = [measure(cost, w, args.steps) for w in (0, 1, 2)]
        print(f"| {cost:g} | {sps[0]:.0f} | {sps[1]:.0f} | {sps[2]:.0f} | {sps[2] / sps[0]:.2f}x |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
