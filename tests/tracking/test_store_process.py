"""The training commands' MLflow store in a process of its own (tracking/store_process.py): the same record
as MLflow in the driver, plain data back, MLflow's own errors back, and a process that outlives neither its
driver nor a store it serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from labfleet.tracking import tags as tag
from labfleet.tracking.runs import Tracker, TrackingWriteFailed
from labfleet.tracking.store_process import RunTag, StoreProcess, StoreProcessGone, is_store_error, store_process
from tests.conftest import EXPERIMENTS


def test_a_tracker_through_the_store_process_writes_what_mlflow_reads(tracking_uri: str) -> None:
    tracker = Tracker(tracking_uri, background=True)
    assert type(tracker.client).__name__ == "StoreClient"
    run_id = tracker.start_run("exp", "trial", "t0", tags={"k": "v"}, params={"lr": "0.1"})
    tracker.log_metrics(run_id, {"loss": 1.5}, step=3)
    tracker.log_bytes(run_id, "checkpoints/latest.pt", b"\x00checkpoint")
    tracker.end_run(run_id, "FINISHED")
    tracker.close()

    found = tracker.client.search_runs([tracker.experiment_id("exp")], "tags.k = 'v'")
    assert [r.info.run_id for r in found] == [run_id]  # plain data with MLflow's attributes
    assert found[0].info.status == "FINISHED" and found[0].data.params == {"lr": "0.1"}
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "loss")] == [(3, 1.5)]
    assert "mlflow" not in type(found[0]).__module__

    mlflow = MlflowClient(tracking_uri)  # and MLflow in this process reads the same
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["k"] == "v" and run.data.metrics == {"loss": 1.5}
    local = mlflow.download_artifacts(run_id, "checkpoints/latest.pt", str(Path(tracking_uri[10:]).parent))
    assert Path(local).read_bytes() == b"\x00checkpoint"


def test_mlflows_errors_come_back_as_themselves(tracking_uri: str) -> None:
    client = store_process().client(tracking_uri)
    with pytest.raises(MlflowException, match="not found"):
        client.get_run("0" * 32)
    experiment = client.create_experiment("e")
    run = client.create_run(experiment)
    client.log_batch(run.info.run_id, [], [], [RunTag("a", "b")])
    assert client.get_run(run.info.run_id).data.tags["a"] == "b"


def test_a_killed_store_process_fails_the_writes_with_a_clear_error(tracking_uri: str) -> None:
    process = StoreProcess()
    try:
        client = process.client(tracking_uri)
        experiment = client.create_experiment("e")
        os.kill(process.proc.pid, signal.SIGKILL)
        process.proc.wait(10)
        with pytest.raises(StoreProcessGone, match="ended") as caught:
            client.create_run(experiment)
        assert is_store_error(caught.value)
    finally:
        process.stop()


def test_a_tracker_whose_store_process_died_reports_the_failed_write(tracking_uri: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    process = StoreProcess()
    monkeypatch.setattr("labfleet.tracking.store_process._PROCESS", process)
    tracker = Tracker(tracking_uri, background=True)
    run_id = tracker.start_run("exp", "seed", "s0")
    os.kill(process.proc.pid, signal.SIGKILL)
    process.proc.wait(10)
    tracker.log_metrics(run_id, {"x": 1.0}, step=1)
    with pytest.raises(TrackingWriteFailed, match="StoreProcessGone"):
        tracker.drain()
    process.stop()


DRIVER = """
import sys, time
from labfleet.tracking.store_process import store_process
process = store_process()
process.client(sys.argv[1]).search_experiments(max_results=1)
print(process.proc.pid, flush=True)
time.sleep(600)
"""


def test_the_store_process_ignores_signals_and_ends_with_its_driver(tracking_uri: str) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, tracking_uri], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        pid = int(driver.stdout.readline())
        os.kill(pid, signal.SIGINT)  # a Ctrl-C or a SIGTERM to the group reaches it too: the driver still
        os.kill(pid, signal.SIGTERM)  # writes its runs' end states through it
        time.sleep(0.5)
        assert _alive(pid)
        driver.kill()  # a driver killed outright: its store process ends with it, nothing left behind
        driver.wait(10)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        driver.kill()
        driver.communicate()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_training_command_imports_no_mlflow_and_writes_the_whole_record(tmp_path: Path) -> None:
    """`-X importtime` lists every module the driver imported (the store process, started without the flag,
    lists none): neither MLflow nor, in-process, Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "labfleet", "run",
                             str(EXPERIMENTS / "cartpole_ppo.yaml"), "--set", "seeds=[0]", "--set",
                             "budget.env_steps=512", "--in-process", "--quiet"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported
    assert not {m for m in imported if m.split(".")[0] in ("mlflow", "ray")}
    assert not (tmp_path / "mlflow.db-wal").exists()  # the store process closed the store before the driver left

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cartpole").experiment_id])
    assert sorted(r.data.tags[tag.ROLE] for r in runs) == ["seed", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    seed = next(r for r in runs if r.data.tags[tag.ROLE] == "seed")
    assert {a.path for a in client.list_artifacts(seed.info.run_id)} >= {"spec.yaml", "checkpoints"}

