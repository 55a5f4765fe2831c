"""Orchestration overhead of a sweep: 64 trials whose training is trivial, 2 in parallel, side by side in
one run: a plain in-process Optuna loop, `labfleet sweep` (on Ray, and `--in-process`), and Ray Tune with
`OptunaSearch`.

    python benchmarks/sweep_overhead.py [--trials 64] [--parallel 2] [--skip-tune]

Every system runs the same work per trial: value iteration on FrozenLake for 5 sweeps and a 10-episode
evaluation (a few milliseconds), with `hparams.gamma` sampled by TPE. All three use SQLite for the
Optuna study; labfleet also writes every trial to a SQLite MLflow store (trial and seed runs, params,
spec, metrics, the final checkpoint), which the other two do not do at all (the store exists before the
clock starts, as it does from a user's second sweep on). One local Ray instance (started before the
clock) serves labfleet and Tune; Tune reuses its actors (`reuse_actors=True`), as labfleet does. A
fourth row adds Tune's own MLflow integration (`MLflowLoggerCallback`, SQLite, no artifacts), the nearest
Tune gets to what labfleet records.

Overhead per trial = (wall time - the work's own time / parallelism) / trials, where the work's own time
is measured in-process for each trial's parameters. For labfleet, the driver's CPU per trial is also given
(the command's process, all its threads; in-process, less the work's own CPU), and beside it the CPU of
the process that writes MLflow's store for the driver (tracking/store_process.py; started, with the store
open, before the clock).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only local Ray (see labfleet.cli)
import optuna  # noqa: E402
import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402

from labfleet.algorithms import registry  # noqa: E402
from labfleet.spec.loading import resolve_spec_data  # noqa: E402

DRIVER_CPU: dict[bool, float] = {}  # in_process -> the command's CPU seconds
STORE_CPU: dict[bool, float] = {}  # in_process -> the store process's CPU seconds


def store_process_cpu() -> float:
    """CPU seconds the driver's store process has used so far (its /proc stat: utime + stime)."""
    from labfleet.tracking import store_process

    process = store_process.store_process()
    fields = Path(f"/proc/{process.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

SPEC = {
    "name": "overhead", "algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0],
    "budget": {"iterations": 5}, "eval": {"episodes": 10, "every_steps": 5}, "resources": {"cpus_per_trial": 1},
    "tracking": {"experiment": "overhead"},
    "sweep": {"metric": "eval/return_mean", "direction": "maximize", "n_trials": 64, "max_parallel": 2,
              "sampler": {"type": "tpe", "seed": 0}, "pruner": {"type": "nop"},
              "space": {"hparams.gamma": {"type": "float", "low": 0.5, "high": 0.999}}},
}


def work(gamma: float) -> float:
    """One trial's training and evaluation, in this process."""
    data = {**SPEC, "hparams": {"gamma": gamma}}
    spec = resolve_spec_data(data, "<bench>", check_env=False)
    trainer = registry.get(spec.algorithm).trainer(spec, 0, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    return float(trainer.evaluate()["eval/return_mean"])


def optuna_loop(trials: int, storage: str) -> tuple[float, list[float]]:
    study = optuna.create_study(storage=storage, study_name="plain", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    start = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        study.tell(trial, work(trial.suggest_float("hparams.gamma", 0.5, 0.999)))
    wall = time.perf_counter() - start
    return wall, [t.params["hparams.gamma"] for t in study.trials]


def labfleet_sweep(trials: int, parallel: int, tmp: Path, in_process: bool = False) -> tuple[float, list[float]]:
    from labfleet.orchestration.commands import execute_sweep

    data = {**SPEC, "sweep": {**SPEC["sweep"], "n_trials": trials, "max_parallel": parallel}}
    spec = resolve_spec_data(data, "<bench>", check_env=False)
    mode = "in-process" if in_process else "ray"
    storage = f"sqlite:///{tmp / f'labfleet-{mode}-optuna.db'}"
    tracking = f"sqlite:///{tmp / f'mlflow-{mode}.db'}"
    MlflowClient(tracking).search_experiments()  # an existing store: its one-time schema setup is not per trial
    from labfleet.tracking.store_process import store_process

    store_process().client(tracking).search_experiments()  # the store process started, the store open in it
    with open(os.devnull, "w") as devnull:
        start, cpu, store_cpu = time.perf_counter(), time.process_time(), store_process_cpu()
        code = execute_sweep(data, spec, tmp / "overhead.yaml", storage=storage, n_trials=None,
                             cli_tracking_uri=tracking, address=None, console=Console(file=devnull), quiet=True,
                             in_process=in_process).code
        wall = time.perf_counter() - start
        DRIVER_CPU[in_process] = time.process_time() - cpu
        STORE_CPU[in_process] = store_process_cpu() - store_cpu
    assert code == 0, code
    study = optuna.load_study(study_name="overhead", storage=storage)
    return wall, [t.params["hparams.gamma"] for t in study.trials]


def ray_tune(trials: int, parallel: int, tmp: Path, mlflow: bool = False) -> tuple[float, list[float]]:
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config: dict) -> None:
        tune.report({"score": work(config["gamma"])})

    search = OptunaSearch(metric="score", mode="max", sampler=optuna.samplers.TPESampler(seed=0),
                          storage=optuna.storages.RDBStorage(f"sqlite:///{tmp / 'tune-optuna.db'}"),
                          study_name="tune-mlflow" if mlflow else "tune")
    callbacks = [MLflowLoggerCallback(tracking_uri=f"sqlite:///{tmp / 'tune-mlflow.db'}", experiment_name="tune",
                                      save_artifact=False)] if mlflow else []
    tuner = tune.Tuner(
        trainable, param_space={"gamma": tune.uniform(0.5, 0.999)},
        tune_config=tune.TuneConfig(search_alg=search, num_samples=trials, max_concurrent_trials=parallel,
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), verbose=0, callbacks=callbacks),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    return wall, [r.config["gamma"] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--skip-tune", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work(0.9)  # imports and first-call costs out of every measurement
    ray.init(logging_level=logging.WARNING, include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        systems = [("optuna loop (in-process, serial)", 1, lambda: optuna_loop(args.trials,
                                                                               f"sqlite:///{tmp / 'plain.db'}")),
                   ("labfleet sweep", args.parallel, lambda: labfleet_sweep(args.trials, args.parallel, tmp)),
                   # one process does every trial's work: its parallelism is 1
                   ("labfleet sweep --in-process", 1, lambda: labfleet_sweep(args.trials, args.parallel, tmp, True))]
        if not args.skip_tune:
            systems.append(("ray tune + OptunaSearch", args.parallel, lambda: ray_tune(args.trials, args.parallel,
                                                                                       tmp)))
            MlflowClient(f"sqlite:///{tmp / 'tune-mlflow.db'}").search_experiments()  # as for labfleet
            systems.append(("ray tune + OptunaSearch + MLflowLoggerCallback", args.parallel,
                            lambda: ray_tune(args.trials, args.parallel, tmp, mlflow=True)))
        for label, parallel, run in systems:
            DRIVER_CPU.clear()
            wall, gammas = run()
            start, cpu = time.perf_counter(), time.process_time()
            for gamma in gammas:
                work(gamma)
            own, own_cpu = time.perf_counter() - start, time.process_time() - cpu
            overhead = (wall - own / parallel) / len(gammas)
            driver = store = ""
            for in_process, used in DRIVER_CPU.items():
                driver = f"{1000 * (used - own_cpu * in_process) / len(gammas):.0f}"
                store = f"{1000 * STORE_CPU[in_process] / len(gammas):.0f}"
            rows.append((label, parallel, len(gammas), wall, own, overhead, driver, store))
            print(f"{label}: {len(gammas)} trials, wall {wall:.2f} s, work {own:.2f} s, "
                  f"overhead {1000 * overhead:.0f} ms/trial, driver CPU {driver or '-'} ms/trial, "
                  f"store process CPU {store or '-'} ms/trial", flush=True)
    print("\n| system | trials | parallel | wall (s) | work (s) | overhead per trial (ms) "
          "| driver CPU per trial (ms) | store process CPU per trial (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, parallel, n, wall, own, overhead, driver, store in rows:
        print(f"| {label} | {n} | {parallel} | {wall:.2f} | {own:.2f} | {1000 * overhead:.0f} | {driver or '-'} "
              f"| {store or '-'} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
