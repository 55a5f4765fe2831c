"""Shared fixtures: a real local Ray instance, a real SQLite MLflow store, and CLI helpers."""

from __future__ import annotations

import logging
import os

# Local Ray instances in the tests listen on 127.0.0.1 only (read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Token authentication, as every labfleet command sets it before Ray is imported: a command invoked in this
# process (CliRunner) sets it too, and a mode that changed after Ray's import would start a local instance
# whose GCS wants a token this process does not send ("Failed to start GCS").
os.environ.setdefault("RAY_AUTH_MODE", "token")
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Training in the test process runs on one torch thread, as each trial actor does (`cpus_per_trial: 1`).
# With torch's default of a thread per core, the small matmuls of these tests slowed down fourfold whenever
# anything else kept one of the two cores busy (a Ray worker, a concurrent command): measured, one A2C seed
# of 100k CartPole steps took 8.8 s on a quiet machine and 35 s beside one busy process with 2 threads,
# 8.3 s with 1; in a full run its learning test took 175 s for three seeds.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """`labfleet ARGS` in a real subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "labfleet", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, 127.0.0.1) for the tests that drive actors in-process."""
    import ray

    # "local": never join a `ray start` cluster that a multi-node test runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    assert "node:127.0.0.1" in ray.cluster_resources(), "the test cluster must listen on loopback only"
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_local_left_clean(request: pytest.FixtureRequest):
    """After each test on the shared local Ray: every placement group it left (a failed test's runner never
    freed its own) is removed, with its actors, so that one test's failure cannot starve the next of CPUs:
    a leftover group once held one of the two CPUs, and a later test waited on its own group for good."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for group_id, info in placement_group_table().items():
        if info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite MLflow store as MLflow itself creates it, before anything is written to it. Creating one
    runs MLflow's database migrations (about 1.5 s); `tracking_uri` copies this one instead. Tests of what
    happens on a store's first use (creation, its log lines) name a path of their own."""
    from mlflow.tracking import MlflowClient

    from labfleet.tracking.uri import close_engines

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    close_engines()  # nothing of it is left in a write-ahead log beside the file
    return path


@pytest.fixture()
def tracking_uri(tmp_path: Path, empty_store: Path) -> str:
    """A SQLite store of this test's own (an empty one: see `empty_store`)."""
    import shutil

    directory = tmp_path / "tracking"
    directory.mkdir()
    shutil.copyfile(empty_store, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


def shipped_spec_for(algorithm: str) -> Path:
    """The first shipped spec of an algorithm (every registered algorithm ships one)."""
    import yaml

    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("algorithm") == algorithm:
            return path
    raise LookupError(f"no spec in experiments/ uses algorithm {algorithm!r}")


def interrupt_group(proc: subprocess.Popen, timeout: float = 90) -> str:
    """Ctrl-C to a command started with start_new_session=True (a terminal signals the whole foreground
    group), then its output; the group is killed if it does not end in time."""
    import signal

    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def descendant_pids(title: str, root: int | None = None) -> list[int]:
    """Processes below `root` (default: this test process) whose command line starts with `title`
    (Ray titles its workers ray::ClassName...): never another test's, so that tests can run in parallel."""
    import psutil

    found = []
    for child in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child.pid)
        except psutil.Error:  # it ended meanwhile
            continue
    return found


def free_ports(count: int = 1) -> list[int]:
    """Distinct TCP ports free on 127.0.0.1 now (the kernel's choice, so parallel tests do not pick the
    same ones): all are held until all are chosen."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def trial_worker_pids(session: int) -> list[int]:
    """Trial actor processes in the session of a `labfleet` command (Ray titles them ray::TrialWorker...;
    Ray gives each worker its own process group, within the driver's session)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, sid, args in (line.split(None, 2) for line in out.splitlines())
            if int(sid) == session and args.startswith("ray::TrialWorker")]
