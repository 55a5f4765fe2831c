"""`labfleet sweep` as a real process: real Ray, real SQLite Optuna and MLflow stores, read back with
optuna.load_study and MlflowClient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, run_cli

VI_SWEEP = {
    "name": "vi-sweep", "algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0],
    "budget": {"iterations": 40}, "eval": {"episodes": 200, "every_steps": 10},
    "tracking": {"experiment": "vi-sweep"},
    "sweep": {
        "metric": "eval/return_mean", "direction": "maximize", "n_trials": 10, "max_parallel": 2,
        "sampler": {"type": "grid"},
        # gamma 0.5 reaches 0.355 at sweep 20, gamma 0.99 reaches 0.68: the first is pruned, the second not.
        "pruner": {"type": "threshold", "lower": 0.6, "n_warmup_steps": 15},
        "space": {"hparams.gamma": {"type": "categorical", "choices": [0.5, 0.99]}},
    },
}


def _stores(tmp_path: Path) -> tuple[str, str]:
    return f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"


def _by_role(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    roles: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        roles.setdefault(run.data.tags["labfleet.role"], []).append(run)
    return roles


def test_grid_sweep_prunes_nests_and_stops_when_exhausted(tmp_path: Path):
    spec = tmp_path / "vi.yaml"
    spec.write_text(yaml.safe_dump(VI_SWEEP))
    mlflow_uri, storage = _stores(tmp_path)
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    study = optuna.load_study(study_name="vi-sweep", storage=storage)
    assert len(study.trials) == 2, "the grid has two points; n_trials=10 must not repeat them"
    states = {t.params["hparams.gamma"]: t for t in study.trials}
    assert states[0.5].state == optuna.trial.TrialState.PRUNED
    assert states[0.99].state == optuna.trial.TrialState.COMPLETE and states[0.99].value >= 0.7
    assert set(states[0.5].intermediate_values) == {10, 20}  # pruned at the first step after the warm-up

    roles = _by_role(MlflowClient(mlflow_uri), "vi-sweep")
    (sweep_run,) = roles["sweep"]
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["optuna.study_name"] == "vi-sweep"
    assert sweep_run.data.tags["optuna.storage"] == storage
    assert sweep_run.data.metrics["best_value"] == states[0.99].value
    assert sweep_run.data.tags["best.hparams.gamma"] == "0.99"
    trials = {r.data.tags["optuna.trial_number"]: r for r in roles["trial"]}
    assert len(trials) == 2
    for t in study.trials:
        run = trials[str(t.number)]
        assert run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.data.params["sampled.hparams.gamma"] == str(t.params["hparams.gamma"])
    # stopped by the pruner (KILLED), or pruned on results that arrived with its end (FINISHED)
    assert trials[str(states[0.5].number)].info.status in ("KILLED", "FINISHED")
    assert trials[str(states[0.99].number)].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in roles["seed"]} == {r.info.run_id for r in roles["trial"]}


def test_nan_trial_fails_cleanly_and_the_sweep_completes(tmp_path: Path):
    data = yaml.safe_load((EXPERIMENTS / "cartpole_reinforce.yaml").read_text())
    data.update({"seeds": [0], "budget": {"env_steps": 4096}, "eval": {"episodes": 3},
                 "sweep": {"n_trials": 2, "max_parallel": 2, "sampler": {"type": "grid"},
                           "pruner": {"type": "nop"},
                           "space": {"hparams.learning_rate": {"type": "categorical", "choices": [1e-3, 1e30]}}}})
    spec = tmp_path / "nan.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = _stores(tmp_path)
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # a trial failed; the sweep still finished
    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    by_lr = {t.params["hparams.learning_rate"]: t for t in study.trials}
    assert by_lr[1e-3].state == optuna.trial.TrialState.COMPLETE
    assert by_lr[1e30].state == optuna.trial.TrialState.FAIL
    assert "non-finite" in by_lr[1e30].user_attrs["error"]
    roles = _by_role(MlflowClient(mlflow_uri), "cartpole")
    failed = next(r for r in roles["trial"] if r.data.tags["optuna.trial_number"] == str(by_lr[1e30].number))
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["labfleet.error"]
    assert roles["sweep"][0].info.status == "FINISHED"


def test_killed_driver_resumes_its_sweep(tmp_path: Path):
    data = yaml.safe_load((EXPERIMENTS / "cartpole_reinforce.yaml").read_text())
    data.update({"seeds": [0], "budget": {"env_steps": 60_000}, "eval": {"episodes": 3},
                 "sweep": {"n_trials": 4, "max_parallel": 2, "sampler": {"type": "random", "seed": 1},
                           "pruner": {"type": "nop"},
                           "space": {"hparams.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3,
                                                               "log": True}}}})
    spec = tmp_path / "resume.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = _stores(tmp_path)
    command = [sys.executable, "-m", "labfleet", "sweep", str(spec), "--tracking-uri", mlflow_uri,
               "--storage", storage, "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial completed in time"
            try:
                study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
                states = [t.state for t in study.trials]
            except KeyError:  # the study does not exist yet
                states = []
            if optuna.trial.TrialState.COMPLETE in states and optuna.trial.TrialState.RUNNING in states:
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-sweep
        proc.wait()
    killed = optuna.load_study(study_name="cartpole-reinforce", storage=storage).trials
    before = {t.number: t.value for t in killed if t.state == optuna.trial.TrialState.COMPLETE}
    left_running = {t.number: t.params for t in killed if t.state == optuna.trial.TrialState.RUNNING}
    assert left_running, "the driver was killed between trials; nothing to resume mid-trial"

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    complete = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == 4
    assert all(complete[n] == v for n, v in before.items()), "earlier complete trials changed"
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert any(left_running.values()), "no trial had sampled its parameters when the driver died"
    for number, params in left_running.items():
        assert study.trials[number].state == optuna.trial.TrialState.FAIL
        rerun = [t for t in study.trials if t.user_attrs.get("labfleet.retry_of") == number]
        if params:  # a trial killed before it sampled anything has nothing to repeat
            assert len(rerun) == 1 and rerun[0].params == params, f"trial {number} was not run again"
        else:
            assert not rerun
    roles = _by_role(MlflowClient(mlflow_uri), "cartpole")
    runs = [r for rs in roles.values() for r in rs]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len(roles["sweep"]) == 1
    finished = [r.data.tags["optuna.trial_number"] for r in roles["trial"] if r.data.tags["optuna.state"] == "COMPLETE"]
    assert sorted(finished) == sorted(str(n) for n in complete), "duplicate or missing finished trial runs"


def test_ctrl_c_fails_running_trials_and_the_next_run_resumes(tmp_path: Path):
    data = yaml.safe_load((EXPERIMENTS / "cartpole_reinforce.yaml").read_text())
    data.update({"seeds": [0], "budget": {"env_steps": 60_000}, "eval": {"episodes": 3},
                 "sweep": {"n_trials": 3, "max_parallel": 2, "sampler": {"type": "random", "seed": 2},
                           "pruner": {"type": "nop"},
                           "space": {"hparams.gamma": {"type": "float", "low": 0.95, "high": 0.999}}}})
    spec = tmp_path / "interrupt.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = _stores(tmp_path)
    command = [sys.executable, "-m", "labfleet", "sweep", str(spec), "--tracking-uri", mlflow_uri,
               "--storage", storage, "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no trial started in time"
            try:
                running = [t for t in optuna.load_study(study_name="cartpole-reinforce", storage=storage).trials
                           if t.state == optuna.trial.TrialState.RUNNING]
            except KeyError:
                running = []
            if running:
                break
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert interrupted
    roles = _by_role(MlflowClient(mlflow_uri), "cartpole")
    assert not [r for rs in roles.values() for r in rs if r.info.status == "RUNNING"]
    assert roles["sweep"][0].info.status == "KILLED"

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 3
    for t in interrupted:  # each interrupted trial's parameters (where it had sampled any) ran again
        assert not t.params or any(r.user_attrs.get("labfleet.retry_of") == t.number and r.params == t.params
                                   for r in study.trials)
    roles = _by_role(MlflowClient(mlflow_uri), "cartpole")
    assert len(roles["sweep"]) == 1 and roles["sweep"][0].info.status == "FINISHED"
