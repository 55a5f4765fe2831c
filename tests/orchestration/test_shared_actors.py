"""`sweep.share_actors`: the seeds of several trials in one actor, each with its own hyperparameters. Each
trial keeps its own record, pruner and end; a pruned trial leaves the actor to the others; a killed actor
restarts every seed from its own checkpoint. Real Ray, real MLflow (SQLite) and Optuna stores."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from labfleet import metrics as M
from labfleet.orchestration.events import Action, Decision, Evaluation, Event, Status
from labfleet.orchestration.recorder import MlflowRecorder
from labfleet.orchestration.runner import TrialRunner, drive, start_shared
from labfleet.spec.loading import load_spec
from labfleet.tracking.runs import Tracker
from tests.conftest import EXPERIMENTS, run_cli

# Long enough that no trial ends within a chunk or two on a fast CPU (the tests act between chunks)
BUDGET = 16384
EVERY = 4096


def _trials(values: list[dict], seeds: list[int]):
    return [load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {
        "seeds": seeds, "budget.env_steps": BUDGET, "resources": {"seeds_per_actor": 8},
        "eval": {"episodes": 2, "every_steps": EVERY}, "hparams.n_steps": 32, **v}) for v in values]


class StopAtFirstEvaluation:
    """A pruner of one trial: STOP at its first evaluation step (a pruned trial ends FINISHED)."""

    def __init__(self) -> None:
        self.target: TrialRunner | None = None

    def handle(self, event: Event) -> Decision | None:
        if isinstance(event, Evaluation) and event.trial is self.target:
            return Decision(Action.STOP, Status.FINISHED, "pruned")
        return None


@pytest.mark.slow
def test_a_pruned_trial_leaves_the_shared_actors_to_the_others(ray_local, tracking_uri: str):
    """Three trials of two seeds on the test cluster's two CPUs: two actors of three seeds each, the middle
    trial split across both. Pruning it drops its seed from each actor; the other two trials train on."""
    specs = _trials([{"hparams.learning_rate": 1e-3, "hparams.n_epochs": 4},
                     {"hparams.learning_rate": 3e-3, "hparams.n_epochs": 6},
                     {"hparams.learning_rate": 3e-4, "hparams.n_epochs": 10}], seeds=[0, 1])
    recorder = MlflowRecorder(Tracker(tracking_uri))
    pruner = StopAtFirstEvaluation()
    runners = [TrialRunner(spec, [recorder, pruner], chunk_seconds=0.05, label=f"t{i}") for i, spec in enumerate(specs)]
    pruner.target = runners[1]
    start_shared(runners, capacity=8)
    units = [{(r.label, s.seed) for r in runners for s in r.seeds.values() if s.shared is unit}
             for unit in {id(s.shared): s.shared for r in runners for s in r.seeds.values()}.values()]
    assert sorted(map(sorted, units)) == [[("t0", 0), ("t0", 1), ("t1", 0)], [("t1", 1), ("t2", 0), ("t2", 1)]]
    drive(runners, poll_seconds=1.0)
    assert runners[1].status == Status.FINISHED and runners[1].stop_reason == "pruned"
    assert all(s.progress < BUDGET and s.shared is None and s.actor is None for s in runners[1].seeds.values())
    for runner in (runners[0], runners[2]):
        assert runner.status == Status.FINISHED and all(s.progress == BUDGET for s in runner.seeds.values())
    recorder.tracker.drain()
    client = MlflowClient(tracking_uri)
    evaluated = {}
    for runner, lr in zip(runners, (1e-3, 3e-3, 3e-4), strict=True):
        for seed in (0, 1):
            run = client.get_run(recorder.seed_run_id(runner, seed))
            assert run.info.status == "FINISHED"
            if runner is not runners[1]:  # (the pruned trial's other seed may have reported nothing yet)
                assert run.data.metrics[M.LEARNING_RATE] == pytest.approx(lr)  # each trial's own rate
            evaluated[runner.label, seed] = [m.step for m in client.get_metric_history(run.info.run_id,
                                                                                        M.EVAL_RETURN_MEAN)]
    # the kept trials evaluate to the end; the pruned one reports nothing after the step that pruned it (its
    # other seed's evaluation of that step may arrive after the stop: it is not delivered)
    for label in ("t0", "t2"):
        assert evaluated[label, 0] == evaluated[label, 1] == list(range(EVERY, BUDGET + 1, EVERY)), evaluated
    assert sorted([evaluated["t1", 0], evaluated["t1", 1]]) in ([[], [EVERY]], [[EVERY], [EVERY]]), evaluated


@pytest.mark.slow
def test_a_killed_shared_actor_restarts_each_seed_from_its_own_checkpoint(ray_local, tracking_uri: str):
    """Three trials of one seed on two CPUs: the second and third share an actor, which is killed after their
    first checkpoints; one new actor restores both, and each ends with the network and optimiser of the two
    trained together without a fault."""
    from labfleet.orchestration.trial import TrialWorkerGroup
    from labfleet.testing import state_differences

    specs = _trials([{"hparams.learning_rate": 2e-3},
                     {"hparams.learning_rate": 1e-3, "hparams.clip_range": 0.1},
                     {"hparams.learning_rate": 5e-4, "hparams.gamma": 0.95}], seeds=[0])
    recorder = MlflowRecorder(Tracker(tracking_uri))
    runners = [TrialRunner(spec, [recorder], chunk_seconds=0.05, label=f"t{i}") for i, spec in enumerate(specs)]
    start_shared(runners, capacity=8)
    states = [r.seeds[0] for r in runners]
    assert states[0].shared is not states[1].shared is states[2].shared
    killed = False
    while not all(r.done for r in runners):
        ready, _ = ray_local.wait(list({s.future for s in states if s.future is not None}), timeout=60)
        assert ready, "no result in 60 s"
        owner = next(s for s in states if s.future in ready)
        owner.shared.on_result()
        if not killed and states[1].checkpoint is not None and states[2].checkpoint is not None \
                and states[1].actor is not None:
            killed = True
            ray_local.kill(states[1].actor, no_restart=True)
    assert killed and [r.status for r in runners] == [Status.FINISHED] * 3
    assert [s.retries for s in states] == [0, 1, 1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor (cpus_per_trial 1): the same rounding
    try:  # the same two members, keyed as their unit keys them
        reference = TrialWorkerGroup([spec.model_dump(mode="json") for spec in specs[1:]], [(0, 0, 0), (1, 1, 0)])
        while not all(m.done for m in reference.group.members.values()):
            reference.advance(seconds=1e9)
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(tracking_uri)
    recorder.tracker.drain()
    for key, runner in enumerate(runners[1:]):
        state = runner.seeds[0]
        run = client.get_run(recorder.seed_run_id(runner, 0))
        assert run.info.status == "FINISHED" and run.data.tags["labfleet.retries"] == "1"
        final = torch.load(io.BytesIO(state.checkpoint), weights_only=True)
        expected = reference.group.members[key].state_dict()
        differ = state_differences(expected, final, only=(".model", ".optimizer"))
        assert not differ, f"{runner.label} differs from a fault-free run at {differ[:5]}"


@pytest.mark.slow
def test_sweep_trials_share_actors_and_keep_their_own_records(tmp_path: Path):
    """`labfleet sweep` with `share_actors`: three trials of two seeds each in one actor (one process for the six
    seed runs), each seed training with its own trial's sampled values; the study and every run finish."""
    data = yaml.safe_load((EXPERIMENTS / "sweeps" / "cartpole_ppo_sweep.yaml").read_text())
    # (one actor of all the local cluster's CPUs: the seeds spread over no more actors than that holds at once)
    from ray._private.utils import get_num_cpus

    data.update({"seeds": [0, 1], "budget": {"env_steps": 2048}, "eval": {"episodes": 2, "every_steps": 1024},
                 "resources": {"seeds_per_actor": 6, "cpus_per_trial": get_num_cpus()}})
    data["hparams"]["n_epochs"] = 2
    data["sweep"].update({"n_trials": 3, "max_parallel": 3, "share_actors": True,
                          "sampler": {"type": "random", "seed": 3}, "pruner": {"type": "nop"}})
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(data))
    mlflow_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("sweep", str(spec), "--tracking-uri", mlflow_uri, "--storage", storage, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name=data["name"], storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(data["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = {r.info.run_id: r for r in runs if r.data.tags["labfleet.role"] == "trial"}
    seeds = [r for r in runs if r.data.tags["labfleet.role"] == "seed"]
    assert len(trials) == 3 and len(seeds) == 6
    assert len({r.data.tags["labfleet.pid"] for r in seeds}) == 1, "one actor for the six seeds of three trials"
    by_number = {t.number: t for t in study.trials}
    for run in seeds:
        trial = trials[run.data.tags["mlflow.parentRunId"]]
        sampled = by_number[int(trial.data.tags["optuna.trial_number"])].params
        lr0 = sampled["hparams.learning_rate"]
        # learning_rate sampled as a number: constant, so the logged rate is the trial's own
        assert run.data.metrics[M.LEARNING_RATE] == pytest.approx(lr0), (lr0, run.data.metrics[M.LEARNING_RATE])
        assert "checkpoints/final.pt" in [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert len({round(r.data.metrics[M.LEARNING_RATE], 12) for r in seeds}) == 3
