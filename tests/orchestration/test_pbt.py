"""Population-based training: explore stays in its spaces, an exploit hands over the donor's checkpoint
exactly (the receiver then acts as the donor does), and a PBT sweep with fewer slots than members
finishes with a lineage that matches its trial runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from labfleet.orchestration.events import (
    Action,
    ChunkResult,
    Evaluation,
    SeedPaused,
    SeedStarted,
    Status,
    TrialStarted,
)
from labfleet.orchestration.pbt import LINEAGE, PopulationBasedTraining, explore, sample, schedule_metric
from labfleet.orchestration.recorder import MlflowRecorder
from labfleet.orchestration.runner import SeedState, TrialRunner
from labfleet.orchestration.trial import TrialWorker
from labfleet.spec.loading import resolve_spec_data
from labfleet.spec.models import ParamSpace, PBTConfig, SweepConfig
from labfleet.tracking.runs import Tracker
from tests.conftest import EXPERIMENTS, run_cli

SPACES = {
    "log": ParamSpace(type="float", low=1e-4, high=3e-3, log=True),
    "float": ParamSpace(type="float", low=0.0, high=0.01),
    "step": ParamSpace(type="float", low=0.1, high=0.3, step=0.05),
    "int": ParamSpace(type="int", low=1, high=20),
    "categorical": ParamSpace(type="categorical", choices=[32, 64, 128]),
}


def _inside(value, space: ParamSpace) -> bool:
    if space.type == "categorical":
        return value in (space.choices or [])
    assert space.low is not None and space.high is not None
    inside = space.low <= value <= space.high
    if space.type == "int":
        return inside and isinstance(value, int)
    if space.step is not None:
        inside = inside and abs((value - space.low) / space.step - round((value - space.low) / space.step)) < 1e-9
    return inside


@pytest.mark.parametrize("name", sorted(SPACES))
def test_explore_and_sample_stay_in_their_space(name: str):
    space = SPACES[name]
    config = PBTConfig(perturbation_interval=10, mutations={"hparams.x": space}, resample_probability=0.25)
    rng = random.Random(0)
    value = sample(space, rng)
    seen = {value}
    for _ in range(2000):
        assert _inside(value, space), value
        value = explore(value, space, config, rng)
        seen.add(value)
    assert len(seen) > 2  # it moves


def test_perturbation_multiplies_by_a_factor_or_resamples():
    space = ParamSpace(type="float", low=1e-6, high=1.0, log=True)
    never = PBTConfig(perturbation_interval=10, mutations={"x": space}, resample_probability=0.0)
    rng = random.Random(1)
    assert {round(explore(0.01, space, never, rng) / 0.01, 9) for _ in range(200)} == {0.8, 1.2}
    clipped = explore(0.9, space, PBTConfig(perturbation_interval=10, mutations={"x": space},
                                           resample_probability=0.0, perturbation_factors=(1.5, 1.5)), rng)
    assert clipped == 1.0


PPO = {**yaml.safe_load((EXPERIMENTS / "cartpole_ppo.yaml").read_text()), "seeds": [0],
       "budget": {"env_steps": 4096}, "eval": {"episodes": 2, "every_steps": 1024}, "tracking": {"experiment": "exp"}}


def test_an_exploit_copies_the_donor_checkpoint_exactly(tracking_uri, tmp_path: Path):
    """Four members on events (no Ray): the worst one at its perturbation point takes the best one's
    checkpoint bytes and its values, explored; a trial worker built from them acts as the donor's does."""
    tracker = Tracker(tracking_uri, background=True)
    recorder = MlflowRecorder(tracker)
    sweep = SweepConfig(metric="eval/return_mean", n_trials=4, scheduler=PBTConfig(
        perturbation_interval=1024, quantile_fraction=0.25, resample_probability=0.0, seed=0,
        mutations={"hparams.learning_rate": SPACES["log"], "hparams.ent_coef": SPACES["float"]}))
    assert sweep.scheduler is not None

    def build(values):
        data = json.loads(json.dumps(PPO))
        for path, value in values.items():
            data["hparams"][path.removeprefix("hparams.")] = value
        return resolve_spec_data(data, "ppo.yaml", check_env=False)

    sweep_run = tracker.start_run("exp", "sweep", "pbt")
    # population 5 with 4 members: the one at its point is suspended afterwards (a member waits to start)
    pbt = PopulationBasedTraining(sweep.scheduler, sweep, 5, build, recorder, sweep_run)
    donor_worker = TrialWorker(build({"hparams.learning_rate": 1e-3}).model_dump(mode="json"), seed=0)
    donor_worker.advance(seconds=0.5)
    donor_bytes = donor_worker.trainer.checkpoint_bytes()
    members = []
    for number, score in enumerate([400.0, 200.0, 100.0, 10.0]):
        values = pbt.initial({"hparams.learning_rate": 1e-3 * (number + 1)})
        runner = TrialRunner(build(values), [recorder, pbt], label=f"pbt/trial={number}")
        pbt.add(runner, number, values)
        runner.status = Status.RUNNING
        runner.emit(TrialStarted(runner))
        state = runner.seeds[0] = SeedState(0, Status.RUNNING, progress=1024,
                                            checkpoint=donor_bytes if number == 0 else f"ckpt{number}".encode())
        runner.emit(SeedStarted(runner, 0, 4096))
        state.evals[1024] = {"eval/return_mean": score}
        runner.emit(Evaluation(runner, 0, 1024, {"eval/return_mean": score}))
        members.append(runner)
    for runner in members:  # each reaches its perturbation point; the pause is what the runner would do
        decision = runner.emit(ChunkResult(runner, 0, [], {}, 1024, None, False, {}))
        assert decision.action == Action.PAUSE
        runner.seeds[0].paused = True
        runner.emit(SeedPaused(runner, 0, 1024))
    tracker.close()

    (entry,) = pbt.lineage  # only the worst (score 10) is in the bottom quarter; the top quarter is trial 0
    assert (entry["from_trial"], entry["to_trial"], entry["step"]) == (0, 3, 1024)
    receiver, donor = members[3], members[0]
    assert receiver.seeds[0].checkpoint == donor_bytes and receiver.seeds[0].reload
    assert all(r.suspended for r in members)
    lr0 = pbt.members[donor].values["hparams.learning_rate"]
    assert entry["new"]["hparams.learning_rate"] in (pytest.approx(lr0 * 0.8), pytest.approx(lr0 * 1.2))
    assert receiver.spec.hparams["learning_rate"] == entry["new"]["hparams.learning_rate"]
    # the record: the lineage on the sweep run, the receiver's schedule on its trial run
    client = MlflowClient(tracker.uri)
    assert json.loads(Path(client.download_artifacts(sweep_run, LINEAGE, str(tmp_path))).read_text()) == pbt.lineage
    history = client.get_metric_history(recorder.trial_run_id(receiver), schedule_metric("hparams.learning_rate"))
    assert [m.step for m in history] == [0, 1024] and history[-1].value == pytest.approx(entry["new"][
        "hparams.learning_rate"])

    # what the receiver's actor would do on resume: load the donor's checkpoint with the receiver's spec
    worker = TrialWorker()
    worker.load(receiver.spec.model_dump(mode="json"), 0, receiver.seeds[0].checkpoint)
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    with torch.no_grad():
        assert np.array_equal(worker.trainer.greedy_actions(obs), donor_worker.trainer.greedy_actions(obs))
    assert worker.trainer.progress == donor_worker.trainer.progress


@pytest.mark.slow
def test_pbt_sweep_with_fewer_slots_than_members_finishes(tracking_uri, tmp_path: Path):
    data = {**PPO, "name": "pbt", "tracking": {"experiment": "pbt"},
            "sweep": {"metric": "eval/return_mean", "n_trials": 3, "max_parallel": 2,
                      "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "nop"},
                      "scheduler": {"type": "pbt", "perturbation_interval": 1024, "quantile_fraction": 0.5,
                                    "seed": 0, "mutations": {
                                        "hparams.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3,
                                                                  "log": True},
                                        "hparams.clip_range": {"type": "float", "low": 0.1, "high": 0.3}}}}}
    spec = tmp_path / "pbt.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    study = optuna.load_study(study_name="pbt", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("pbt")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    (sweep_run,) = [r for r in runs if r.data.tags["labfleet.role"] == "sweep"]
    trials = {int(r.data.tags["optuna.trial_number"]): r for r in runs if r.data.tags["labfleet.role"] == "trial"}
    names = [a.path for a in client.list_artifacts(sweep_run.info.run_id)]
    lineage = json.loads(Path(client.download_artifacts(sweep_run.info.run_id, LINEAGE, str(tmp_path))).read_text()) \
        if LINEAGE in names else []
    for number, run in trials.items():  # every member's schedule starts at its initial values
        first = client.get_metric_history(run.info.run_id, "pbt/learning_rate")[0]
        assert first.step == 0
        assert first.value == pytest.approx(float(study.trials[number].user_attrs["pbt.config"]
                                                  ["hparams.learning_rate"])) or any(
            e["to_trial"] == number for e in lineage)
    for entry in lineage:  # each exploit shows in the receiver's schedule at its step, inside the spaces
        assert entry["from_trial"] in trials and entry["to_trial"] in trials
        assert entry["from_trial"] != entry["to_trial"]
        history = client.get_metric_history(trials[entry["to_trial"]].info.run_id, "pbt/learning_rate")
        assert any(m.step == entry["step"] and m.value == pytest.approx(entry["new"]["hparams.learning_rate"])
                   for m in history)
        assert 1e-4 <= entry["new"]["hparams.learning_rate"] <= 3e-3
        assert 0.1 <= entry["new"]["hparams.clip_range"] <= 0.3
    for trial in study.trials:  # every member's objective is its trial run's final evaluation
        run = trials[trial.number]
        assert run.data.metrics["eval/return_mean"] == pytest.approx(trial.value)
    report = run_cli("report", "pbt", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (tmp_path / "report" / "pbt.png").exists() == bool(lineage)
    if lineage:  # Optuna's importance and parallel coordinates would show only the initial values
        assert not (tmp_path / "report" / "param_importances.png").exists()
        assert "population-based training changed them" in (tmp_path / "report" / "report.html").read_text()


def _lineage(client: MlflowClient, experiment: str, tmp: Path) -> list:
    exp = client.get_experiment_by_name(experiment)
    (sweep_run,) = client.search_runs([exp.experiment_id], "tags.`labfleet.role` = 'sweep'")
    if LINEAGE not in {a.path for a in client.list_artifacts(sweep_run.info.run_id)}:
        return []
    return json.loads(Path(client.download_artifacts(sweep_run.info.run_id, LINEAGE, str(tmp))).read_text())


@pytest.mark.slow
def test_killed_pbt_driver_resumes(tracking_uri, tmp_path: Path):
    """SIGKILL to the whole command mid-population; the same command again finishes the population,
    keeps the lineage recorded so far and leaves nothing RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = {**PPO, "name": "pbt-kill", "budget": {"env_steps": 6144}, "tracking": {"experiment": "pbt-kill"},
            "sweep": {"metric": "eval/return_mean", "n_trials": 3, "max_parallel": 2,
                      "sampler": {"type": "random", "seed": 1}, "pruner": {"type": "nop"},
                      "scheduler": {"type": "pbt", "perturbation_interval": 1024, "quantile_fraction": 0.5,
                                    "seed": 1, "mutations": {
                                        "hparams.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3}}}}}
    spec = tmp_path / "pbt.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [sys.executable, "-m", "labfleet", "sweep", str(spec), "--tracking-uri", mlflow_uri,
               "--storage", storage, "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    client = MlflowClient(mlflow_uri)
    try:
        deadline = time.monotonic() + 180
        while True:  # until two members have trained past their first perturbation point
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the population did not get going in time"
            try:
                trials = optuna.load_study(study_name="pbt-kill", storage=storage).trials
            except KeyError:
                trials = []
            if sum(max(t.intermediate_values, default=0) > 1024 for t in trials) >= 2:
                break
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    before = _lineage(client, "pbt-kill", tmp_path / "before")

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="pbt-kill", storage=storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 3
    exp = client.get_experiment_by_name("pbt-kill")
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
    after = _lineage(client, "pbt-kill", tmp_path / "after")
    assert after[:len(before)] == before


def test_every_scheduler_type_builds_and_pbt_takes_up_its_lineage(tracking_uri):
    """`sweep.scheduler` by its type (orchestration/schedulers.py): each type a config can name has a
    builder, and the PBT a resumed sweep builds goes on from the lineage its sweep run holds."""
    import typing

    from labfleet.orchestration.schedulers import SCHEDULERS, SchedulerContext, build_scheduler
    from labfleet.spec.models import SchedulerConfig

    assert set(typing.get_args(SchedulerConfig.model_fields["type"].annotation)) == set(SCHEDULERS)
    tracker = Tracker(tracking_uri, background=True)
    recorder = MlflowRecorder(tracker)
    sweep_run = tracker.start_run("exp", "sweep", "pbt")
    earlier = [{"step": 1024, "from_trial": 0, "to_trial": 3, "from_score": 400.0, "to_score": 10.0,
                "old": {}, "new": {}}]
    tracker.log_bytes(sweep_run, LINEAGE, json.dumps(earlier).encode())
    config = PBTConfig(perturbation_interval=1024, mutations={"hparams.ent_coef": SPACES["float"]})
    sweep = SweepConfig(n_trials=4, scheduler=config)
    told: list = []
    scheduler = build_scheduler(config, SchedulerContext(sweep, 4, lambda values: None, recorder, sweep_run,
                                                         told.append))
    assert isinstance(scheduler, PopulationBasedTraining)
    assert scheduler.lineage == earlier and scheduler.on_exploit == told.append
    assert set(scheduler.initial({})) == {"hparams.ent_coef"}  # a mutable value the space does not set
    tracker.close()
