"""Driver heartbeats and `labfleet reconcile`: a dead driver's runs end KILLED, a live one's are untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from labfleet.tracking import tags as tag
from labfleet.tracking.heartbeat import (
    driver_alive,
    driver_identity,
    launcher_tags,
    stale_runs,
)
from labfleet.tracking.runs import Tracker
from tests.conftest import EXPERIMENTS, run_cli


def test_driver_identity_tells_live_dead_and_unknown_drivers():
    assert driver_alive(driver_identity()) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = driver_identity(child.pid)
    child.wait()
    assert driver_alive(identity) is False  # the same pid with another start time would be False too
    assert driver_alive("elsewhere.example:123:abcd1234:99") is None  # another machine: cannot tell
    assert driver_alive("garbage") is None


def test_a_requeued_slurm_job_knows_its_earlier_starts_drivers_are_gone(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "lab")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    me = driver_identity()
    assert "/slurm-4711.2:" in me and driver_alive(me) is True
    assert launcher_tags() == {"labfleet.slurm_job": "4711", "labfleet.slurm_cluster": "lab"}
    # the driver of the job's first start, on another node: gone, though this machine cannot see that node
    assert driver_alive("node17/slurm-4711.0:123:abcd1234:99") is False
    assert driver_alive("node17/slurm-4711.2:123:abcd1234:99") is None  # this start's: cannot tell
    assert driver_alive("node17/slurm-99.0:123:abcd1234:99") is None  # another job's
    monkeypatch.delenv("SLURM_JOB_ID")
    assert "/slurm-" not in driver_identity() and launcher_tags() == {}


def test_stale_runs_by_heartbeat_age(tracking_uri: str):
    tracker = Tracker(tracking_uri)
    ours = tracker.start_run("exp", "seed", "ours")
    remote_old = tracker.start_run("exp", "seed", "remote-old")
    remote_fresh = tracker.start_run("exp", "seed", "remote-fresh")
    legacy = tracker.start_run("exp", "seed", "legacy")
    client = MlflowClient(tracking_uri)
    now = time.time()
    for run_id, beat in ((remote_old, now - 600), (remote_fresh, now - 10)):
        client.set_tag(run_id, tag.DRIVER, "elsewhere.example:123:abcd1234:99")
        client.set_tag(run_id, tag.HEARTBEAT, str(int(beat)))
    client.delete_tag(legacy, tag.DRIVER)
    client.delete_tag(legacy, tag.HEARTBEAT)
    found = {s.run.info.run_id: s.reason for s in stale_runs(client, stale_after=150, now=now + 1000)}
    assert remote_old in found and "last sign of life 160" in found[remote_old]  # counted from `now`
    assert ours not in found, "a live driver's run is never stale"
    assert legacy in found and "no driver heartbeat" in found[legacy]
    assert remote_fresh in found  # 1010 s later it is stale too
    assert remote_fresh not in {s.run.info.run_id for s in stale_runs(client, stale_after=150, now=now)}


def _seed_runs_logging(client: MlflowClient) -> int:
    exp = client.get_experiment_by_name("cartpole")
    if exp is None:
        return 0
    return sum("time/env_steps" in r.data.metrics
               for r in client.search_runs([exp.experiment_id], "tags.`labfleet.role` = 'seed'"))


@pytest.mark.slow
def test_reconcile_ends_a_dead_drivers_runs_and_leaves_a_live_ones_alone(tmp_path: Path, tracking_uri: str):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "labfleet", "run", str(EXPERIMENTS / "cartpole_reinforce.yaml"),
                             "--set", "seeds=[0]", "--set", "budget.env_steps=5000000", "--tracking-uri",
                             tracking_uri, "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = MlflowClient(tracking_uri)
    try:
        deadline = time.monotonic() + 120
        while _seed_runs_logging(client) < 1:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the seed never started"
            time.sleep(0.5)
        live = run_cli("reconcile", "--tracking-uri", tracking_uri, cwd=tmp_path)
        assert live.returncode == 0, live.stdout + live.stderr
        assert "nothing to reconcile" in live.stdout
        runs = client.search_runs([client.get_experiment_by_name("cartpole").experiment_id])
        assert len(runs) == 2 and {r.info.status for r in runs} == {"RUNNING"}
        assert all(r.data.tags[tag.DRIVER].split(":")[1] == str(proc.pid) for r in runs)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies without a word
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    dead = run_cli("reconcile", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert dead.returncode == 0, dead.stdout + dead.stderr
    assert "ended 2 run(s) KILLED" in dead.stdout and "no longer running" in dead.stdout
    runs = client.search_runs([client.get_experiment_by_name("cartpole").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}
    assert all(tag.RECONCILED in r.data.tags for r in runs)
    again = run_cli("reconcile", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert "nothing to reconcile" in again.stdout


def test_reconcile_refuses_a_missing_store(tmp_path: Path):
    result = run_cli("reconcile", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert result.returncode == 2 and "no MLflow store" in result.stderr
    assert list(tmp_path.iterdir()) == []
