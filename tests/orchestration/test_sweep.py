"""`labfleet sweep` as a real process: real Ray, real SQLite Optuna and MLflow stores, read back with
optuna.load_study and MlflowClient."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, run_cli, trial_worker_pids

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


def _popen_sweep(tmp_path: Path, data: dict, file: str) -> tuple[subprocess.Popen, list[str], dict, str, str]:
    """`labfleet sweep` on `data` in its own process group: (process, command, env, tracking uri, storage)."""
    spec = tmp_path / file
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = _stores(tmp_path)
    command = [sys.executable, "-m", "labfleet", "sweep", str(spec), "--tracking-uri", mlflow_uri,
               "--storage", storage, "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, command, env, mlflow_uri, storage


def _wait_for_trials(proc: subprocess.Popen, storage: str, ready, what: str, timeout: float = 180) -> list:
    """Poll the study until `ready(trials)`; fail if the sweep ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, what
        try:
            trials = optuna.load_study(study_name="cartpole-reinforce", storage=storage).trials
        except KeyError:  # the study does not exist yet
            trials = []
        if ready(trials):
            return trials
        time.sleep(0.3)


@pytest.mark.slow
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
    client = MlflowClient(mlflow_uri)  # the objective's curve over the complete trials, by trial number
    objective = client.get_metric_history(sweep_run.info.run_id, "objective/eval/return_mean")
    assert [(m.step, m.value) for m in objective] == [(states[0.99].number, states[0.99].value)]
    trials = {r.data.tags["optuna.trial_number"]: r for r in roles["trial"]}
    assert len(trials) == 2
    # each trial run carries its mean-over-seeds evaluation history (one seed here: its own curve)
    complete = trials[str(states[0.99].number)].info.run_id
    assert [m.step for m in client.get_metric_history(complete, "eval/return_mean")] == [10, 20, 30, 40]
    for t in study.trials:
        run = trials[str(t.number)]
        assert run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.state"] == t.state.name
        # the trial's params are its sampled values; its seed runs carry the whole resolved spec
        assert set(run.data.params) == {"hparams.gamma", "seeds"}
        assert run.data.params["hparams.gamma"] == str(t.params["hparams.gamma"])
    # stopped by the pruner (KILLED), or pruned on results that arrived with its end (FINISHED)
    assert trials[str(states[0.5].number)].info.status in ("KILLED", "FINISHED")
    assert trials[str(states[0.99].number)].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in roles["seed"]} == {r.info.run_id for r in roles["trial"]}
    # the same command again: the study has its trials, which is said at once (no Ray, no store opened)
    again = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path)
    assert again.returncode == 0 and "already has 2 finished trials (wanted 2): nothing to run" in again.stdout
    assert "starting Ray" not in again.stdout and "best: trial" in again.stdout, again.stdout
    assert len(optuna.load_study(study_name="vi-sweep", storage=storage).trials) == 2


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("share", [False, True], ids=["own-actors", "shared-actors"])
def test_killed_driver_resumes_its_sweep(tmp_path: Path, share: bool):
    data = yaml.safe_load((EXPERIMENTS / "cartpole_reinforce.yaml").read_text())
    # 150k steps: a trial runs about 10 s here (60k took 4.5 s, and one CI run's polls missed the few seconds
    # in which a second-wave trial was running past its first checkpoint, so the sweep ended unkilled)
    data.update({"seeds": [0], "budget": {"env_steps": 150_000}, "eval": {"episodes": 3, "every_steps": 8192},
                 "sweep": {"n_trials": 4, "max_parallel": 2, "sampler": {"type": "random", "seed": 1},
                           "pruner": {"type": "nop"},
                           "space": {"hparams.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3,
                                                               "log": True}}}})
    if share:  # the two running trials in one actor of all the local cluster's CPUs; a rerun continues each
        from ray._private.utils import get_num_cpus

        data["resources"] = {"seeds_per_actor": 2, "cpus_per_trial": get_num_cpus()}
        data["sweep"]["share_actors"] = True
    proc, command, env, mlflow_uri, storage = _popen_sweep(tmp_path, data, "resume.yaml")
    client = MlflowClient(mlflow_uri)

    def checkpointed(trial) -> bool:  # its seed's latest checkpoint is durable in MLflow
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            return False
        seeds = client.search_runs([client.get_run(run_id).info.experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{run_id}'")
        return bool(seeds) and any(a.path == "checkpoints/latest.pt"
                                   for a in client.list_artifacts(seeds[0].info.run_id, "checkpoints"))

    def mid_way(trials) -> bool:  # a trial complete, and one still running past a durable checkpoint
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
            return False
        past = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING and checkpointed(t)]
        # `trials` was read before the MLflow queries: one may have finished since, so look again just
        # before the kill (a trial that ends in the few milliseconds left would make the test fail)
        now = {t.number: t.state for t in optuna.load_study(study_name="cartpole-reinforce", storage=storage).trials}
        return any(now[n] == optuna.trial.TrialState.RUNNING for n in past)

    try:
        _wait_for_trials(proc, storage, mid_way, "no trial completed, or none running reached a checkpoint, in time")
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended by itself: the assertion above says how
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-sweep
        proc.wait()
    killed = optuna.load_study(study_name="cartpole-reinforce", storage=storage).trials
    before = {t.number: t.value for t in killed if t.state == optuna.trial.TrialState.COMPLETE}
    left_running = {t.number: t.params for t in killed if t.state == optuna.trial.TrialState.RUNNING}
    continuable = {t.number: t.user_attrs["mlflow_run_id"] for t in killed
                   if t.state == optuna.trial.TrialState.RUNNING and checkpointed(t)}
    assert continuable, "the driver was killed with no trial mid-way past a checkpoint"

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    study = optuna.load_study(study_name="cartpole-reinforce", storage=storage)
    complete = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == 4, result.stdout[-3000:] + str([(t.number, t.state) for t in study.trials])
    assert all(complete[n] == v for n, v in before.items()), "earlier complete trials changed"
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number, run_id in continuable.items():  # continued in its runs from its checkpoint, not run again
        assert study.trials[number].state == optuna.trial.TrialState.COMPLETE
        assert not [t for t in study.trials if t.user_attrs.get("labfleet.retry_of") == number]
        assert client.get_run(run_id).info.status == "FINISHED"
        (seed,) = client.search_runs([client.get_run(run_id).info.experiment_id],
                                     f"tags.`mlflow.parentRunId` = '{run_id}'")
        assert seed.info.status == "FINISHED" and seed.data.tags["labfleet.resumed_from"] == "checkpoint"
        assert seed.data.tags["labfleet.resume"] == "exact"
        for name in seed.data.metrics:
            steps = [m.step for m in client.get_metric_history(seed.info.run_id, name)]
            assert len(steps) == len(set(steps)), f"{name} repeats a step"
    for number, params in left_running.items():
        if number in continuable:
            continue
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
    if share:  # the trials that finished before the kill had trained side by side in one actor
        number_of = {r.info.run_id: r.data.tags["optuna.trial_number"] for r in roles["trial"]}
        pids = {r.data.tags["labfleet.pid"] for r in roles["seed"]
                if int(number_of[r.data.tags["mlflow.parentRunId"]]) in before}
        assert len(before) == 2 and len(pids) == 1, (before, pids)


def test_resume_makes_mlflow_agree_with_the_study(tmp_path: Path):
    """The states a driver killed at any point can leave, built by hand on real stores, then `_recover`:
    trial 0 finished cleanly; trial 1's MLflow record was written (COMPLETE) but Optuna was never told;
    trial 2 was running; trial 3 was told COMPLETE by a driver that died before its run was ended."""
    from labfleet.orchestration.recorder import MlflowRecorder
    from labfleet.orchestration.searcher import recover
    from labfleet.tracking.runs import Tracker

    mlflow_uri, storage = _stores(tmp_path)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    tracker = Tracker(mlflow_uri, background=True)
    sweep_run = tracker.start_run("exp", "sweep", "s")
    trials, runs, seeds = [], [], []
    for number in range(4):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        run_id = tracker.start_run("exp", "trial", f"s/trial={number}", sweep_run,
                                   tags={"optuna.trial_number": str(number), "optuna.state": "RUNNING"})
        seeds.append(tracker.start_run("exp", "seed", f"s/trial={number}/seed=0", run_id))
        trial.set_user_attr("mlflow_run_id", run_id)
        trials.append(trial)
        runs.append(run_id)
    for number in (0, 1):  # written in the order `_tell` keeps: MLflow first
        tracker.end_run(seeds[number], "FINISHED")
        tracker.end_run(runs[number], "FINISHED")
        tracker.set_tags(runs[number], {"optuna.state": "COMPLETE"})
    study.tell(trials[0], 100.0)
    study.tell(trials[3], 300.0)
    tracker.close()

    recovering = Tracker(mlflow_uri, background=True)
    recover(optuna.load_study(study_name="s", storage=storage), MlflowRecorder(recovering), "exp", sweep_run)
    recovering.close()

    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state for t in study.trials]
    assert states[:4] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                          optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.user_attrs["labfleet.retry_of"] for t in waiting) == [1, 2]
    assert {t.user_attrs["labfleet.retry_of"]: t.system_attrs["fixed_params"] for t in waiting} == \
        {n: trials[n].params for n in (1, 2)}
    client = MlflowClient(mlflow_uri)
    got = [(client.get_run(r).info.status, client.get_run(r).data.tags["optuna.state"]) for r in runs]
    assert got == [("FINISHED", "COMPLETE"), ("FINISHED", "FAIL"), ("KILLED", "FAIL"), ("FINISHED", "COMPLETE")]
    assert [client.get_run(r).info.status for r in seeds] == ["FINISHED", "FINISHED", "KILLED", "FINISHED"]


@pytest.mark.slow
def test_ctrl_c_fails_running_trials_and_the_next_run_resumes(tmp_path: Path):
    data = yaml.safe_load((EXPERIMENTS / "cartpole_reinforce.yaml").read_text())
    data.update({"seeds": [0], "budget": {"env_steps": 60_000}, "eval": {"episodes": 3},
                 "sweep": {"n_trials": 3, "max_parallel": 2, "sampler": {"type": "random", "seed": 2},
                           "pruner": {"type": "nop"},
                           "space": {"hparams.gamma": {"type": "float", "low": 0.95, "high": 0.999}}}})
    proc, command, env, mlflow_uri, storage = _popen_sweep(tmp_path, data, "interrupt.yaml")
    try:
        _wait_for_trials(proc, storage, lambda trials: any(t.state == optuna.trial.TrialState.RUNNING
                                                           for t in trials), "no trial started in time")
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


class _InterruptingSampler(optuna.samplers.RandomSampler):
    """A random sampler whose `before_trial` (called inside `study.ask()`, after the storage has created
    the trial) delivers Ctrl-C to this process: the moment at which a Ctrl-C once left a trial RUNNING."""

    def before_trial(self, study, trial) -> None:  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_inside_ask_leaves_no_trial_running(tmp_path: Path):
    from rich.console import Console

    from labfleet.orchestration.searcher import OptunaSearcher
    from labfleet.orchestration.session import DriverSession
    from labfleet.orchestration.study import check_sweep
    from labfleet.spec.loading import resolve_spec_data
    from labfleet.tracking.runs import Tracker

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="ask", sampler=_InterruptingSampler(seed=0))
    spec = resolve_spec_data(VI_SWEEP, "vi.yaml", check_env=False)
    sweep = check_sweep(VI_SWEEP, spec, "vi.yaml")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    searcher = OptunaSearcher(DriverSession(tracker, Console(quiet=True)), study, VI_SWEEP, spec, "vi.yaml", sweep,
                              total=1, sweep_run="no-run")
    with pytest.raises(KeyboardInterrupt):  # raised once the trial is recorded as this driver's
        searcher.ask()
    assert searcher.asked == {0}
    searcher.interrupted()
    tracker.close()
    trials = optuna.load_study(study_name="ask", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]


def _vi_spec(tmp_path: Path, **sweep: object) -> Path:
    data = {**VI_SWEEP, "sweep": {**VI_SWEEP["sweep"], "pruner": {"type": "nop"}, **sweep}}
    spec = tmp_path / "vi.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec


@pytest.mark.slow
def test_multi_objective_sweep_logs_its_pareto_front(tmp_path: Path):
    spec = _vi_spec(tmp_path, metrics=["eval/return_mean", "eval/return_std"], directions=["maximize", "minimize"],
                    space={"hparams.gamma": {"type": "categorical", "choices": [0.3, 0.6, 0.9, 0.99]}})
    mlflow_uri, storage = _stores(tmp_path)
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    study = optuna.load_study(study_name="vi-sweep", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    front = sorted(t.number for t in study.best_trials)
    assert front, "a complete study has a non-empty Pareto front"

    client = MlflowClient(mlflow_uri)
    (sweep_run,) = _by_role(client, "vi-sweep")["sweep"]
    assert sweep_run.data.tags["pareto.trials"] == ",".join(map(str, front))
    local = client.download_artifacts(sweep_run.info.run_id, "pareto_front.json", str(tmp_path))
    rows = json.loads(Path(local).read_text())
    assert [r["trial"] for r in rows] == front
    for row in rows:
        trial = study.trials[row["trial"]]
        assert row["values"] == {"eval/return_mean": trial.values[0], "eval/return_std": trial.values[1]}
        assert row["mlflow_run_id"] == trial.user_attrs["mlflow_run_id"]
    names = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert "pareto_front.png" in names
    assert "Pareto front" in result.stdout


@pytest.mark.slow
def test_journal_file_storage_is_readable_and_resumes(tmp_path: Path):
    spec = _vi_spec(tmp_path)
    mlflow_uri, _ = _stores(tmp_path)
    journal = tmp_path / "study.log"
    command = ("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", f"journal:{journal}")
    first = run_cli(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="vi-sweep", storage=storage)
    assert sorted(t.params["hparams.gamma"] for t in study.trials) == [0.5, 0.99]
    values = {t.number: t.value for t in study.trials}
    again = run_cli(*command, cwd=tmp_path)  # the grid is used up: nothing new runs, nothing changes
    assert again.returncode == 0, again.stdout + again.stderr
    study = optuna.load_study(study_name="vi-sweep", storage=storage)
    assert {t.number: t.value for t in study.trials} == values
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.slow
def test_bad_storage_url_is_bad_input_and_writes_nothing(tmp_path: Path):
    spec = _vi_spec(tmp_path)
    mlflow_uri, _ = _stores(tmp_path)
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", "nosuchdb://x/y", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--storage" in result.stderr and "not a storage URL" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vi.yaml"]


POSTGRES = os.environ.get("LABFLEET_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _postgres_or_skip() -> None:
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(POSTGRES).connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means the same: no server to test against
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI needs PostgreSQL at {POSTGRES}: {exc}") from exc
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES}")


@pytest.mark.slow
def test_postgres_storage(tmp_path: Path):
    _postgres_or_skip()
    name = f"vi-sweep-{uuid.uuid4().hex[:8]}"
    spec = _vi_spec(tmp_path, study_name=name)
    mlflow_uri, _ = _stores(tmp_path)
    try:
        result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", POSTGRES, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        study = optuna.load_study(study_name=name, storage=POSTGRES)
        assert sorted(t.params["hparams.gamma"] for t in study.trials) == [0.5, 0.99]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        (sweep_run,) = _by_role(MlflowClient(mlflow_uri), "vi-sweep")["sweep"]
        assert sweep_run.data.tags["optuna.storage"] == POSTGRES  # no password in it to redact
    finally:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=POSTGRES)


@pytest.mark.slow
def test_killed_trial_actor_in_a_sweep_resumes_from_its_checkpoint(tmp_path: Path):
    data = yaml.safe_load((EXPERIMENTS / "cartpole_reinforce.yaml").read_text())
    # Long enough that the trial is still training when the test sees its first evaluation: a chunk is
    # about a second, and REINFORCE on an idle machine steps some 40k CartPole steps in it.
    data.update({"seeds": [0], "budget": {"env_steps": 245_760}, "eval": {"episodes": 2, "every_steps": 4096},
                 "sweep": {"n_trials": 1, "max_parallel": 1, "pruner": {"type": "nop"}, "max_retries": 1,
                           "space": {"hparams.gamma": {"type": "float", "low": 0.98, "high": 0.99}}}})
    proc, _, _, mlflow_uri, storage = _popen_sweep(tmp_path, data, "kill.yaml")
    try:  # once the trial has reported (so a checkpoint exists), kill its actor
        trials = _wait_for_trials(proc, storage, lambda trials: bool(trials and trials[0].intermediate_values),
                                  "the trial never reported")
        reported = max(trials[0].intermediate_values)
        pids = trial_worker_pids(proc.pid)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    (trial,) = optuna.load_study(study_name="cartpole-reinforce", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert max(trial.intermediate_values) == 245_760 and reported < 245_760
    client = MlflowClient(mlflow_uri)
    (seed,) = _by_role(client, "cartpole")["seed"]
    assert seed.info.status == "FINISHED" and seed.data.tags["labfleet.retries"] == "1"
    # Resumed from the checkpoint, not from scratch: the evaluations never go back to an earlier step.
    history = sorted(client.get_metric_history(seed.info.run_id, "eval/return_mean"),
                     key=lambda m: (m.timestamp, m.step))
    steps = [m.step for m in history]
    assert steps == sorted(steps) and steps[-1] == 245_760


@pytest.mark.slow
def test_trials_with_more_seeds_than_the_cluster_holds_finish(tmp_path: Path):
    """Each trial has 3 seeds and the cluster holds 2 at a time: a finished seed's idle actor must not keep
    the resources a waiting seed needs (it once did, and the sweep hung)."""
    half = (os.cpu_count() or 2) / 2
    data = {**VI_SWEEP, "seeds": [0, 1, 2], "resources": {"cpus_per_trial": half},
            "sweep": {**VI_SWEEP["sweep"], "n_trials": 3, "max_parallel": 2, "pruner": {"type": "nop"},
                      "sampler": {"type": "random", "seed": 0},
                      "space": {"hparams.gamma": {"type": "float", "low": 0.5, "high": 0.99}}}}
    spec = tmp_path / "vi.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = _stores(tmp_path)
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path,
                     timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="vi-sweep", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    seeds = _by_role(MlflowClient(mlflow_uri), "vi-sweep")["seed"]
    assert len(seeds) == 9 and {r.info.status for r in seeds} == {"FINISHED"}
