"""SIGTERM (what `timeout`, Slurm and Kubernetes send to a process group) ends every command the way
Ctrl-C does, though a local Ray's own processes get the signal too; a sweep that cannot succeed stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, run_cli

SPEC = EXPERIMENTS / "cartpole_reinforce.yaml"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def _all_runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]


def _group(pgid: int) -> list[str]:
    """The processes left in a process group (read from /proc)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            left.append(text.split(" (", 1)[1].rsplit(")", 1)[0])
    return left


def _terminate_once_running(command: list[str], cwd: Path, client: MlflowClient, seeds: int) -> tuple[int, str, float]:
    """Start `command` in its own process group, SIGTERM the group once `seeds` seed runs log metrics;
    (exit code, output, seconds from the signal to the exit)."""
    proc = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len([r for r in _all_runs(client) if r.data.tags.get("labfleet.role") == "seed"
                   and "time/env_steps" in r.data.metrics]) < seeds:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the seeds never started"
            time.sleep(0.5)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
        return proc.returncode, output, time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["while Ray starts", "while training"])
def test_sigterm_to_the_driver_alone_leaves_no_process(tmp_path: Path, tracking_uri: str, when: str):
    """`kill PID` (a service manager, a colleague) reaches the driver only, not the local Ray's processes:
    the command still ends them all, its agents included, and ends its runs KILLED."""
    client = MlflowClient(tracking_uri)
    command = [sys.executable, "-m", "labfleet", "run", str(SPEC), "--set", "seeds=[0]", "--set",
               "budget.env_steps=5000000", "--tracking-uri", tracking_uri, "--quiet"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)

    def ready() -> bool:
        if when == "while Ray starts":
            return any("raylet" in name for name in _group(proc.pid))
        return any(r.data.tags.get("labfleet.role") == "seed" and r.data.metrics for r in _all_runs(client))

    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05 if when == "while Ray starts" else 0.5)
        os.kill(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
        code = proc.returncode
        time.sleep(2)
        left = _group(proc.pid)
    finally:
        if proc.poll() is None or _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code in (1, 130), output
    assert "Traceback" not in output, output
    assert left == [], f"left running: {left}"
    assert not [r for r in _all_runs(client) if r.info.status == "RUNNING"]


@pytest.mark.slow  # a whole command on Ray
def test_sigterm_to_run_ends_every_run_killed(tmp_path: Path, tracking_uri: str):
    client = MlflowClient(tracking_uri)
    code, output, seconds = _terminate_once_running(
        [sys.executable, "-m", "labfleet", "run", str(SPEC), "--set", "seeds=[0,1]", "--set",
         "budget.env_steps=5000000", "--tracking-uri", tracking_uri, "--quiet"], tmp_path, client, 2)
    assert code == 130, output
    assert seconds < 45, f"took {seconds:.0f} s to stop"
    runs = _all_runs(client)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}, [(r.data.tags["labfleet.role"],
                                                                          r.info.status) for r in runs]


@pytest.mark.slow  # a whole command on Ray
def test_sigterm_to_sweep_leaves_nothing_running(tmp_path: Path):
    data = yaml.safe_load(SPEC.read_text())
    data.update({"seeds": [0], "budget": {"env_steps": 5_000_000}, "eval": {"episodes": 3},
                 "sweep": {"n_trials": 4, "max_parallel": 2, "sampler": {"type": "random", "seed": 0},
                           "pruner": {"type": "nop"},
                           "space": {"hparams.gamma": {"type": "float", "low": 0.95, "high": 0.999}}}})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    mlflow_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    client = MlflowClient(mlflow_uri)
    code, output, seconds = _terminate_once_running(
        [sys.executable, "-m", "labfleet", "sweep", str(tmp_path / "sweep.yaml"), "--tracking-uri", mlflow_uri,
         "--storage", storage, "--quiet"], tmp_path, client, 2)
    assert code == 130, output
    assert seconds < 45, f"took {seconds:.0f} s to stop"
    runs = _all_runs(client)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"], [(r.data.tags["labfleet.role"],
                                                                         r.info.status) for r in runs]
    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


FLAKY_SIM = '''
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class CrashingEnv(CartPoleEnv):
    """Makes and resets like CartPole (so the spec validates); its simulator crashes on the first step."""

    def step(self, action):
        raise RuntimeError("simulator crashed: licence server unreachable")
'''


@pytest.mark.slow
def test_sweep_that_cannot_succeed_stops(tmp_path: Path):
    (tmp_path / "crashing_env.py").write_text(FLAKY_SIM)
    data = yaml.safe_load(SPEC.read_text())
    data.update({"env": "crashing_env:CrashingEnv", "seeds": [0], "budget": {"env_steps": 2048},
                 "sweep": {"n_trials": 50, "max_parallel": 1, "max_consecutive_failures": 3,
                           "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "nop"},
                           "space": {"hparams.gamma": {"type": "float", "low": 0.9, "high": 0.999}}}})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    mlflow_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("sweep", "sweep.yaml", "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopped: 3 trials in a row failed" in result.stdout
    assert result.stdout.count("licence server unreachable") >= 3  # each failure says why
    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 3
    client = MlflowClient(mlflow_uri)
    trials = [r for r in _all_runs(client) if r.data.tags["labfleet.role"] == "trial"]
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FAILED"}
    assert all("licence server" in r.data.tags["labfleet.error"] for r in trials)
    # stopped because its trials fail: the sweep run says so, as the exit code does
    assert {r.info.status for r in _all_runs(client) if r.data.tags["labfleet.role"] == "sweep"} == {"FAILED"}
