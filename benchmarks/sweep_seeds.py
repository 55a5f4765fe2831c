"""A PPO sweep with several seeds per configuration, with and without `resources.seeds_per_actor`.

    python benchmarks/sweep_seeds.py [--trials 16] [--seeds 3] [--steps 20000] [--per-actor 3,1]

Runs the whole `labfleet sweep experiments/sweeps/cartpole_ppo_sweep.yaml` command (random sampler, no
pruner, so both sides train the same configurations in full; 2 trials at a time on this machine's 2 cores)
once per `--per-actor` value, each into its own temporary SQLite store, and prints the wall time of each
and the best trial's mean return. Issue 15's row: 16 configurations x 3 seeds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "sweeps" / "cartpole_ppo_sweep.yaml"


def sweep(trials: int, seeds: int, steps: int, per_actor: int) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        sets = {"seeds": list(range(seeds)), "budget.env_steps": steps, "sweep.n_trials": trials,
                "sweep.sampler": "{type: random, seed: 0}", "sweep.pruner": "{type: nop}",
                "sweep.storage": f"sqlite:///{tmp}/optuna.db", "eval.every_steps": steps // 2,
                "resources.seeds_per_actor": per_actor}
        cmd = [sys.executable, "-m", "labfleet", "sweep", str(SPEC), "--tracking-uri", uri]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`labfleet.role` = 'trial'")
        best = max(r.data.metrics.get("eval/return_mean", float("-inf")) for r in runs)
        assert len(runs) == trials, f"{len(runs)} trial runs, expected {trials}"
    return wall, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--per-actor", default="3,1")
    args = parser.parse_args()
    print("| configurations x seeds | env steps each | seeds_per_actor | whole sweep (s) | speed-up "
          "| best mean return |")
    print("|---|---|---|---|---|---|")
    results = []
    for per_actor in [int(k) for k in args.per_actor.split(",")]:
        wall, best = sweep(args.trials, args.seeds, args.steps, per_actor)
        results.append((per_actor, wall, best))
    slowest = max(wall for _, wall, _ in results)
    for per_actor, wall, best in results:
        print(f"| {args.trials} x {args.seeds} | {args.steps} | {per_actor} | {wall:.1f} | {slowest / wall:.2f}x | "
              f"{best:.1f} |")


if __name__ == "__main__":
    main()
