"""A killed driver loses at most one checkpoint interval (issue 14 §3): the same command again reopens the
same runs and continues every unfinished seed from its last checkpoint, each metric step logged once; a
finished run is never reopened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS, run_cli
from tests.orchestration.test_faults import _assert_same_model_as_a_fault_free_run

SPEC = EXPERIMENTS / "cartpole_reinforce.yaml"
# 81920 steps: checkpoints come every 4096, so the test's polls have most of a seed's run to see both seeds
# checkpointed and kill the driver (at 40960 a CI run saw a seed FINISHED before the kill)
STEPS = 81920
ARGS = ["--set", "seeds=[0,1]", "--set", f"budget.env_steps={STEPS}", "--set", "eval={episodes: 2, every_steps: 4096}",
        "--set", "hparams.n_envs=4", "--set", "hparams.n_steps=64"]
SPEC_RESOLVED = load_spec(SPEC, {"budget.env_steps": STEPS, "hparams.n_envs": 4, "hparams.n_steps": 64})


def _runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("cartpole")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=100)


def _checkpointed(client: MlflowClient) -> bool:
    seeds = [r for r in _runs(client) if r.data.tags["labfleet.role"] == "seed"]
    return len(seeds) == 2 and all(
        any(a.path == "checkpoints/latest.pt" for a in client.list_artifacts(r.info.run_id, "checkpoints"))
        for r in seeds)


@pytest.mark.slow
def test_killed_driver_continues_from_durable_checkpoints(tmp_path: Path, tracking_uri: str):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    command = [sys.executable, "-m", "labfleet", "run", str(SPEC), *ARGS, "--tracking-uri", tracking_uri, "--quiet"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    client = MlflowClient(tracking_uri)
    try:
        deadline = time.monotonic() + 180
        while not _checkpointed(client):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint reached the store in time"
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die at once
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {r.info.run_id: r for r in _runs(client)}
    assert {r.info.status for r in before.values()} == {"RUNNING"} and len(before) == 3
    logged_before = {rid: max(m.step for m in client.get_metric_history(rid, "time/env_steps"))
                     for rid, r in before.items() if r.data.tags["labfleet.role"] == "seed"}
    assert all(step < STEPS for step in logged_before.values())

    again = run_cli(*command[3:], cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continuing trial run" in again.stdout and "from checkpoints: seeds [0, 1]" in again.stdout
    after = {r.info.run_id: r for r in _runs(client)}
    assert set(after) == set(before), "the rerun made new runs instead of continuing the old ones"
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    for run_id, run in after.items():
        if run.data.tags["labfleet.role"] != "seed":
            continue
        assert run.data.tags["labfleet.resumed_from"] == "checkpoint"
        for name in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run_id, name)]
            assert len(steps) == len(set(steps)), f"{name} repeats a step: {sorted(steps)}"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "time/env_steps"))
        assert steps[-1] >= STEPS and logged_before[run_id] in steps  # the old curve is kept and continued
        assert any(a.path == "checkpoints/final.pt" for a in client.list_artifacts(run_id, "checkpoints"))
        # Exact resume: the seed ends with the network a fault-free run of it ends with, bit for bit.
        assert run.data.tags["labfleet.resume"] == "exact"
        final = Path(client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp_path))).read_bytes()
        _assert_same_model_as_a_fault_free_run(SPEC_RESOLVED, int(run.data.tags["labfleet.seed"]), final)
    trial = next(r for r in after.values() if r.data.tags["labfleet.role"] == "trial")
    assert "eval/return_mean" in trial.data.metrics  # aggregated over both seeds at the end
    # A rerun after success makes new runs: tests/test_first_hour.py (a whole command and two seeds' training
    # again here, 15-20 s, for the same lookup of unfinished runs).
