"""Two drivers on one store at the same time: a second `run` or `suite` never writes into the runs a live
driver owns (it is refused, exit 2, and writes nothing), and two `sweep` drivers of one study each take
their own trials, so that Optuna's and MLflow's records agree and no run is written by both. A dead
driver's work is still taken over (tests/orchestration/test_driver_resume.py, test_sweep.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

# A training function that reports a step every 0.1 s until the test creates its `release` file: the
# first driver is still training whenever the second one looks, however fast or loaded the machine is.
GATED = """
import time
from pathlib import Path


def main(config, ctx):
    step = ctx.restored["step"] if ctx.restored else 0
    while step < ctx.budget:
        step += 1
        ctx.report(step, {"eval/score": float(step)})
        if step % 10 == 0:
            ctx.checkpoint({"step": step})
        if Path(config["release"]).exists():
            return
        time.sleep(0.1)
"""


def _gated_spec(tmp_path: Path) -> Path:
    (tmp_path / "gated.py").write_text(GATED)
    spec = tmp_path / "conc.yaml"
    spec.write_text(yaml.safe_dump({"name": "conc", "algorithm": "gated:main", "seeds": [0, 1],
                                    "budget": {"iterations": 100_000}, "hparams": {"release": str(tmp_path / "go")},
                                    "tracking": {"experiment": "conc"}}))
    return spec


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def _assert_steps_once(client: MlflowClient, runs: list) -> None:
    for run in runs:
        for name in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert len(steps) == len(set(steps)), f"{run.info.run_name}: {name} repeats a step: {sorted(steps)}"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "suite"])
def test_second_driver_never_continues_a_live_drivers_runs(tmp_path: Path, tracking_uri: str, command: str):
    spec = _gated_spec(tmp_path)
    target = spec
    if command == "suite":
        target = tmp_path / "suite.yaml"
        target.write_text(yaml.safe_dump({"name": "conc-suite", "tracking": {"experiment": "conc"},
                                          "experiments": [{"spec": "conc.yaml"}]}))
    args = [sys.executable, "-m", "labfleet", command, str(target), "--tracking-uri", tracking_uri, "--quiet"]
    first = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    client = MlflowClient(tracking_uri)
    try:
        _wait(first, lambda: any(r.data.tags["labfleet.role"] == "seed" and r.data.metrics
                                 for r in _runs(client, "conc")), "the first driver's seed run logged nothing")
        before = {r.info.run_id for r in _runs(client, "conc")}
        second = run_cli(*args[3:], cwd=tmp_path, env=_env())
        assert first.poll() is None, first.communicate()[0]
        assert second.returncode == 2, second.stdout + second.stderr
        out = second.stdout + second.stderr
        assert "is being written by another driver" in out and "--fresh" in out, out
        assert "Traceback" not in out
        assert {r.info.run_id for r in _runs(client, "conc")} == before, "the refused driver made runs"
        assert all(r.info.status == "RUNNING" for r in _runs(client, "conc")), "the refused driver ended a run"
        (tmp_path / "go").touch()
        assert first.wait(timeout=120) == 0, first.communicate()[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
    runs = _runs(client, "conc")
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["labfleet.driver"] for r in runs}) == 1, "a run was written by two drivers"
    _assert_steps_once(client, runs)


@pytest.mark.slow
def test_two_sweep_drivers_each_take_their_own_trials(tracking_uri, tmp_path: Path):
    spec = _gated_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    data.update({"seeds": [0], "sweep": {
        "metric": "eval/score", "n_trials": 4, "max_parallel": 1, "sampler": {"type": "random", "seed": 3},
        "pruner": {"type": "nop"}, "space": {"hparams.x": {"type": "float", "low": 0.0, "high": 1.0}}}})
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [sys.executable, "-m", "labfleet", "sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage,
            "--quiet"]
    first = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)

    def running(count: int):
        def ready() -> bool:
            try:
                trials = optuna.load_study(study_name="conc", storage=storage).trials
            except KeyError:
                return False
            return sum(t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                       for t in trials) >= count
        return ready

    second = None
    try:
        _wait(first, running(1), "the first driver started no trial")
        second = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        _wait(second, running(2), "the second driver started no trial beside the first one's")
        (tmp_path / "go").touch()
        out_second = second.communicate(timeout=300)[0]
        out_first = first.communicate(timeout=300)[0]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 9)
    assert first.returncode == 0, out_first
    assert second.returncode == 0, out_second

    study = optuna.load_study(study_name="conc", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert set(states.values()) == {optuna.trial.TrialState.COMPLETE}, states  # none failed by the other driver
    # n_trials counts both drivers' trials: 4, or one more where both asked at the same moment
    assert 4 <= len(states) <= 5, states
    drivers = {t.user_attrs["labfleet.driver"] for t in study.trials}
    assert len(drivers) == 2, "the second driver ran no trial of its own"

    client = MlflowClient(mlflow_uri)
    runs = _runs(client, "conc")
    assert {r.info.status for r in runs} == {"FINISHED"}
    trial_runs = [r for r in runs if r.data.tags["labfleet.role"] == "trial"]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs}
    assert sorted(by_number) == sorted(states) and len(trial_runs) == len(states), "a trial has two runs"
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["labfleet.driver"] == trial.user_attrs["labfleet.driver"], "written by the other"
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert [s.data.tags["labfleet.driver"] for s in seeds] == [trial.user_attrs["labfleet.driver"]]
    assert len([r for r in runs if r.data.tags["labfleet.role"] == "sweep"]) == 1
    _assert_steps_once(client, runs)


def test_checkpoint_damage_is_found_without_loading_it() -> None:
    import io

    import torch

    from labfleet.orchestration.recorder import checkpoint_damage

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(1000.0)}, buffer)
    data = buffer.getvalue()
    assert checkpoint_damage(data) is None
    assert checkpoint_damage(data[: len(data) // 2]) is not None
    assert checkpoint_damage(b"") is not None
    at = data.index(torch.arange(1000.0).numpy().tobytes()[8:64]) + 100  # inside the tensor's bytes
    flipped = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]
    assert "CRC" in (checkpoint_damage(flipped) or "")


@pytest.mark.slow
def test_a_damaged_checkpoint_restarts_its_seed_from_scratch(tmp_path: Path, tracking_uri: str):
    """A dead driver's seed whose checkpoints/latest.pt was damaged (a full disk, a bad copy): the rerun says
    so and trains that seed from the start in the same run instead of failing it."""
    import signal

    spec = _gated_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    spec.write_text(yaml.safe_dump({**data, "seeds": [0]}))
    args = [sys.executable, "-m", "labfleet", "run", str(spec), "--tracking-uri", tracking_uri, "--quiet"]
    first = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    try:
        _wait(first, lambda: any(store.rglob("latest.pt")), "no checkpoint reached the store")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (latest,) = store.rglob("latest.pt")
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    (tmp_path / "go").touch()
    again = run_cli(*args[3:], cwd=tmp_path, env=_env())
    assert again.returncode == 0, again.stdout + again.stderr
    assert "is damaged" in again.stdout and "from scratch" in again.stdout, again.stdout
    client = MlflowClient(tracking_uri)
    runs = _runs(client, "conc")
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2  # the same trial and seed runs
    (seed,) = [r for r in runs if r.data.tags["labfleet.role"] == "seed"]
    assert seed.data.tags["labfleet.resumed_from"] == "scratch"
    _assert_steps_once(client, runs)
