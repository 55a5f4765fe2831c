"""A PPO sweep with several seeds per configuration, with and without `resources.seeds_per_actor`.

    python benchmarks/sweep_seeds.py [--trials 16] [--seeds 3] [--steps 20000] [--per-actor 3,1] [--share 24]

Runs the whole `labfleet sweep experiments/sweeps/cartpole_ppo_sweep.yaml` command (random sampler, no
pruner, so both sides train the same configurations in full; 2 trials at a time on this machine's 2 cores)
once per `--per-actor` value, each into its own temporary SQLite store, and prints the wall time of each
and the best trial's mean return. The default: 16 configurations x 3 seeds. `--share N` adds a run with
`sweep.share_actors` (every trial asked at once, `max_parallel` = trials, their seeds packed into actors of up
to N seeds: 24 puts 16 x 3 seeds in two actors, one a core).
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


def sweep(trials: int, seeds: int, steps: int, per_actor: int, share: bool = False) -> tuple[float, list[float]]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        sets = {"seeds": list(range(seeds)), "budget.env_steps": steps, "sweep.n_trials": trials,
                "sweep.sampler": "{type: random, seed: 0}", "sweep.pruner": "{type: nop}",
                "sweep.storage": f"sqlite:///{tmp}/optuna.db", "eval.every_steps": steps // 2,
                "resources.seeds_per_actor": per_actor}
        if share:
            sets.update({"sweep.share_actors": "true", "sweep.max_parallel": trials})
        cmd = [sys.executable, "-m", "labfleet", "sweep", str(SPEC), "--tracking-uri", uri]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`labfleet.role` = 'trial'")
        returns = sorted(r.data.metrics.get("eval/return_mean", float("-inf")) for r in runs)
        assert len(runs) == trials, f"{len(runs)} trial runs, expected {trials}"
    return wall, returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--per-actor", default="3,1")
    parser.add_argument("--share", default="", help="seeds per shared actor (comma-separated) for share_actors runs")
    args = parser.parse_args()
    print("| configurations x seeds | env steps each | seeds_per_actor | share_actors | whole sweep (s) | speed-up "
          "| best mean return | mean over trials |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(int(k), True) for k in args.share.split(",") if k] + [(int(k), False) for k in args.per_actor.split(",")]
    results = []
    for per_actor, share in runs:
        wall, returns = sweep(args.trials, args.seeds, args.steps, per_actor, share)
        results.append((per_actor, share, wall, returns))
        print(f"  ({per_actor}, share={share}: {wall:.1f} s, trial means {[round(r, 1) for r in returns]})",
              file=sys.stderr, flush=True)
    slowest = max(wall for _, _, wall, _ in results)
    for per_actor, share, wall, returns in results:
        print(f"| {args.trials} x {args.seeds} | {args.steps} | {per_actor} | {'yes' if share else 'no'} "
              f"| {wall:.1f} | {slowest / wall:.2f}x | {max(returns):.1f} | {sum(returns) / len(returns):.1f} |")


if __name__ == "__main__":
    main()
