"""Population-based training, labfleet against Ray Tune's `PopulationBasedTraining`, on the same task:
`experiments/sweeps/cartpole_ppo_pbt.yaml` (PPO on CartPole-v1, a population of 4, 2 at a time,
perturbations every 10k env steps, the same mutations, quantile and resample probability).

    python benchmarks/pbt_compare.py [--skip-tune] [--population 4] [--parallel 2]

Both run labfleet's own PPO trainer (Tune through a `tune.Trainable` that trains it in 10k-step
steps and checkpoints it to Tune's storage), so the difference is the PBT machinery and the
orchestration, not the learner. Reported per system: the wall time until the best member first
evaluates at >= 475 (10 episodes, greedy policy), the best final evaluation, the number of exploits,
and the whole run's wall time. Tune's checkpoints go through a filesystem (`storage_path`); labfleet's
travel through the driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only local Ray (see labfleet.cli)
import ray  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "sweeps" / "cartpole_ppo_pbt.yaml"
SOLVED = 475.0


def labfleet_pbt(tmp: Path, population: int, parallel: int) -> dict[str, float]:
    from labfleet.orchestration.commands import execute_sweep
    from labfleet.spec.loading import apply_overrides, resolve_spec_data

    data = apply_overrides(yaml.safe_load(SPEC.read_text()), {"sweep.n_trials": population,
                                                              "sweep.max_parallel": parallel})
    spec = resolve_spec_data(data, str(SPEC), check_env=False)
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(tracking).search_experiments()
    start = time.time()
    with open(os.devnull, "w") as devnull:
        code = execute_sweep(data, spec, SPEC, storage=f"sqlite:///{tmp / 'optuna.db'}", n_trials=None,
                             cli_tracking_uri=tracking, address=None, console=Console(file=devnull), quiet=True).code
    wall = time.time() - start
    assert code == 0, code
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
    runs = client.search_runs([experiment.experiment_id])
    solved, best, exploits = float("inf"), float("-inf"), 0
    for run in runs:
        role = run.data.tags["labfleet.role"]
        if role == "seed":
            for m in client.get_metric_history(run.info.run_id, "eval/return_mean"):
                if m.value >= SOLVED:
                    solved = min(solved, m.timestamp / 1000 - start)
        elif role == "trial":
            best = max(best, run.data.metrics.get("eval/return_mean", float("-inf")))
        elif role == "sweep":
            import json

            local = client.download_artifacts(run.info.run_id, "pbt_lineage.json", str(tmp))
            exploits = len(json.loads(Path(local).read_text()))
    return {"solved_s": solved, "best_final": best, "exploits": exploits, "wall_s": wall}


def tune_pbt(tmp: Path, population: int, parallel: int) -> dict[str, float]:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    data = yaml.safe_load(SPEC.read_text())
    pbt_config = data["sweep"]["scheduler"]
    budget = int(data["budget"]["env_steps"])
    interval = int(pbt_config["perturbation_interval"])

    class PPOTrainable(tune.Trainable):
        def setup(self, config: dict) -> None:
            from labfleet.algorithms import registry
            from labfleet.spec.loading import resolve_spec_data

            spec_data = {**data, "hparams": {**data["hparams"], **config}}
            spec_data.pop("sweep")
            spec = resolve_spec_data(spec_data, str(SPEC), check_env=False)
            self.trainer = registry.get("ppo").trainer(spec, 0, "cpu")

        def step(self) -> dict:
            target = (self.trainer.progress // interval + 1) * interval
            while self.trainer.progress < min(target, budget):
                self.trainer.train_iteration()
            result = self.trainer.evaluate()
            return {"eval/return_mean": result["eval/return_mean"], "env_steps": self.trainer.progress,
                    "wall": time.time(), "done": self.trainer.progress >= budget}

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            (Path(checkpoint_dir) / "trainer.pt").write_bytes(self.trainer.checkpoint_bytes())

        def load_checkpoint(self, checkpoint_dir: str) -> None:
            self.trainer.restore_bytes((Path(checkpoint_dir) / "trainer.pt").read_bytes())

    mutations = {}
    for path, space in pbt_config["mutations"].items():
        name = path.removeprefix("hparams.")
        mutations[name] = (tune.loguniform if space.get("log") else tune.uniform)(space["low"], space["high"])
    scheduler = PopulationBasedTraining(
        time_attr="env_steps", perturbation_interval=interval, hyperparam_mutations=mutations,
        quantile_fraction=pbt_config["quantile_fraction"], resample_probability=pbt_config["resample_probability"])
    space = data["sweep"]["space"]["hparams.learning_rate"]
    tuner = tune.Tuner(
        tune.with_resources(PPOTrainable, {"cpu": 1}),
        param_space={"learning_rate": tune.loguniform(space["low"], space["high"])},
        tune_config=tune.TuneConfig(scheduler=scheduler, metric="eval/return_mean", mode="max",
                                    num_samples=population, max_concurrent_trials=parallel),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), verbose=0, stop={"env_steps": budget},
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, num_to_keep=2)),
    )
    start = time.time()
    results = tuner.fit()
    wall = time.time() - start
    solved, best = float("inf"), float("-inf")
    for result in results:
        frame = result.metrics_dataframe
        hit = frame[frame["eval/return_mean"] >= SOLVED]
        if len(hit):
            solved = min(solved, float(hit["wall"].min()) - start)
        best = max(best, float(result.metrics["eval/return_mean"]))
    return {"solved_s": solved, "best_final": best, "exploits": float("nan"), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--skip-tune", action="store_true")
    args = parser.parse_args()
    ray.init(logging_level=logging.WARNING, include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        systems = [("labfleet sweep (scheduler: pbt)", lambda: labfleet_pbt(tmp / "labfleet", args.population,
                                                                           args.parallel))]
        if not args.skip_tune:
            systems.append(("ray tune PopulationBasedTraining", lambda: tune_pbt(tmp / "tune", args.population,
                                                                                 args.parallel)))
        for label, run in systems:
            (tmp / label.split()[0]).mkdir(exist_ok=True)
            row = run()
            rows.append((label, row))
            print(label, row, flush=True)
    print(f"\n| system | population | parallel | time to {SOLVED:g} (s) | best final | exploits | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {args.population} | {args.parallel} | {row['solved_s']:.1f} | {row['best_final']:.1f} "
              f"| {row['exploits']:g} | {row['wall_s']:.1f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
