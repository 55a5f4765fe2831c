"""`--in-process`: `run`, `suite` and `sweep` train in the driver's own process, without Ray, and record the
same runs as on Ray actors; what needs other processes is refused before anything starts."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from labfleet.orchestration.backend import CallFailed, InProcessBackend, LocalWorker
from labfleet.orchestration.trial import TrialWorker
from tests.conftest import EXPERIMENTS, run_cli
from tests.orchestration.test_run_cli import BOOM_ENV, SMALL, _runs
from tests.orchestration.test_signals import _all_runs, _terminate_once_running
from tests.orchestration.test_sweep import VI_SWEEP, _by_role, _stores

SPEC = EXPERIMENTS / "cartpole_reinforce.yaml"


def _curves(client: MlflowClient, experiment: str, metric: str) -> dict[str, list[tuple[int, float]]]:
    return {r.data.tags["labfleet.seed"]: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id,
                                                                                                       metric))
            for r in _runs(client, experiment) if r.data.tags["labfleet.role"] == "seed"}


@pytest.mark.slow  # the same spec on Ray too
def test_in_process_run_records_what_ray_actors_record(tmp_path: Path):
    """Two seeds taking turns in the driver train exactly as two actors do: the same curves, the same runs."""
    uris = {mode: f"sqlite:///{tmp_path / mode / 'mlflow.db'}" for mode in ("ray", "in-process")}
    for mode, uri in uris.items():
        (tmp_path / mode).mkdir()
        flags = ["--in-process"] if mode == "in-process" else []
        result = run_cli("run", str(SPEC), *SMALL, *flags, "--tracking-uri", uri, cwd=tmp_path / mode)
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("starting Ray" in result.stdout) == (mode == "ray"), result.stdout
    clients = {mode: MlflowClient(uri) for mode, uri in uris.items()}
    for metric in ("eval/return_mean", "loss/policy", "time/env_steps"):
        assert _curves(clients["in-process"], "cartpole", metric) == _curves(clients["ray"], "cartpole", metric)
    for client in clients.values():
        runs = _runs(client, "cartpole")
        assert sorted(r.data.tags["labfleet.role"] for r in runs) == ["seed", "seed", "trial"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            if run.data.tags["labfleet.role"] == "seed":
                # (latest.pt too where a chunk ended after an evaluation, which depends on the chunks' timing)
                names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
                assert "checkpoints/final.pt" in names <= {"checkpoints/final.pt", "checkpoints/latest.pt"}

def test_in_process_trial_that_raises_fails_with_its_traceback(tmp_path: Path, tracking_uri: str):
    (tmp_path / "boom_env.py").write_text(BOOM_ENV)
    result = run_cli("run", str(SPEC), *SMALL, "--in-process", "--set", "env=boom_env:BoomEnv",
                     "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "boom: the simulator crashed" in result.stdout and "Traceback" not in result.stderr
    runs = _runs(MlflowClient(tracking_uri), "cartpole")
    seeds = [r for r in runs if r.data.tags["labfleet.role"] == "seed"]
    assert {r.info.status for r in runs} == {"FAILED"}
    # the error tag keeps where the user's code raised
    assert all("boom_env.py" in r.data.tags["labfleet.error"] for r in seeds)


@pytest.mark.parametrize(("flags", "says"), [
    (["--set", "resources.rollout_workers=1"], "needs more processes"),
    (["--address", "127.0.0.1:6379"], "joins no Ray cluster"),
])
def test_in_process_refuses_what_one_process_cannot_run(tmp_path: Path, flags: list[str], says: str):
    store = tmp_path / "store"
    store.mkdir()
    result = run_cli("run", str(SPEC), "--in-process", *flags, "--tracking-uri", f"sqlite:///{store}/mlflow.db",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr
    assert list(store.iterdir()) == [], "nothing is written before the checks pass"


@pytest.mark.slow  # a whole command, stopped, then again
def test_sigterm_to_an_in_process_run_kills_its_runs_and_a_rerun_resumes(tmp_path: Path, tracking_uri: str):
    """The signal lands inside a seed's training (the driver's own thread): the runs end KILLED, and the same
    command continues each seed from its last checkpoint, each metric step logged once."""
    client = MlflowClient(tracking_uri)
    command = ["run", str(SPEC), "--in-process", "--set", "seeds=[0,1]", "--set", "budget.env_steps=60000",
               "--set", "eval={episodes: 2, every_steps: 4000}", "--tracking-uri", tracking_uri, "--quiet"]
    code, output, seconds = _terminate_once_running([sys.executable, "-m", "labfleet", *command], tmp_path, client, 2)
    assert code == 130 and "Traceback" not in output, output
    assert seconds < 30, f"took {seconds:.0f} s to stop"
    killed = _all_runs(client)
    assert len(killed) == 3 and {r.info.status for r in killed} == {"KILLED"}
    again = run_cli(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = _all_runs(client)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    for seed, curve in _curves(client, "cartpole", "time/env_steps").items():
        steps = [step for step, _ in curve]
        assert len(steps) == len(set(steps)), f"seed {seed} logged a step twice"
        assert curve[-1][1] >= 60000


def test_in_process_sweep_prunes_and_finishes(tmp_path: Path):
    spec = tmp_path / "vi.yaml"
    spec.write_text(yaml.safe_dump(VI_SWEEP))
    mlflow_uri, storage = _stores(tmp_path)
    result = run_cli("sweep", str(spec), "--in-process", "--tracking-uri", mlflow_uri, "--storage", storage,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="vi-sweep", storage=storage)
    states = {t.params["hparams.gamma"]: t.state for t in study.trials}
    assert states == {0.5: optuna.trial.TrialState.PRUNED, 0.99: optuna.trial.TrialState.COMPLETE}
    roles = _by_role(MlflowClient(mlflow_uri), "vi-sweep")
    assert len(roles["sweep"]) == 1 and len(roles["trial"]) == 2 and len(roles["seed"]) == 2
    assert not [r for runs in roles.values() for r in runs if r.info.status == "RUNNING"]


def test_calls_run_oldest_first_and_errors_carry_the_traceback():
    backend = InProcessBackend()
    order: list[str] = []

    class Recorder:
        def __init__(self, name: str, device_of):
            self.name = name

        def work(self) -> str:
            order.append(self.name)
            if self.name == "bad":
                raise ValueError("no good")
            return self.name

    a, b, bad = (backend.start(Recorder, backend.reserve([{"CPU": 1}]), 1, 0, name) for name in ("a", "b", "bad"))
    first, second, third = backend.call(b, "work"), backend.call(a, "work"), backend.call(bad, "work")
    assert backend.wait([third, second, first], 0.5) == [first] and order == ["b"]  # nothing runs before a wait
    assert backend.get(first) == "b" and backend.get(second) == "a"
    with pytest.raises(CallFailed) as failed:
        backend.get(third)
    assert not backend.lost(failed.value)
    assert "ValueError: no good" in backend.error_text(failed.value) and "in work" in backend.error_text(failed.value)


def test_a_trial_in_process_computes_on_a_gpu_only_when_it_holds_one():
    worker = LocalWorker(TrialWorker, 0, ())
    assert worker.device_of("auto") == "cpu"
    with pytest.raises(RuntimeError, match="holds no GPU"):
        worker.device_of("cuda")
    holding = LocalWorker(TrialWorker, 1, ())
    assert holding.device_of("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_ctrl_c_inside_a_call_stops_the_command_not_the_seed():
    backend = InProcessBackend()

    class Interrupted:
        def __init__(self, device_of):
            pass

        def work(self) -> None:
            signal.raise_signal(signal.SIGINT)

    call = backend.call(backend.start(Interrupted, None, 1, 0), "work")
    with pytest.raises(KeyboardInterrupt):
        backend.wait([call], 0.5)


def test_a_ctrl_c_swallowed_where_it_landed_still_stops_the_session(tracking_uri: str):
    """Python ignores a KeyboardInterrupt raised inside a weakref callback (it prints "Exception ignored in"):
    a Ctrl-C that lands there still stops the command at the driver's next round, every run KILLED."""
    import io
    import weakref

    from rich.console import Console

    from labfleet.orchestration.events import ChunkResult
    from labfleet.orchestration.session import DriverSession, FixedFeed
    from labfleet.spec.loading import load_spec
    from labfleet.tracking.runs import Tracker

    class Target:
        pass

    class LandInACallback:
        fired = False

        def handle(self, event):
            if isinstance(event, ChunkResult) and not self.fired:
                self.fired = True
                target = Target()
                self.ref = weakref.ref(target, lambda _: signal.raise_signal(signal.SIGINT))
                del target  # the callback runs here, and the handler's KeyboardInterrupt is lost in it

    spec = load_spec(SPEC, {"seeds": [0], "budget": {"env_steps": 300_000}})
    tracker = Tracker(tracking_uri, background=True)
    session = DriverSession(tracker, Console(file=io.StringIO()), quiet=True, backend=InProcessBackend())
    with session:
        runner = session.runner(spec, LandInACallback())
        session.drive(FixedFeed([(runner, None)]))
    tracker.close()
    assert session.interrupted and runner.status.name == "KILLED"
    runs = _runs(MlflowClient(tracking_uri), "cartpole")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
