"""Every listener of the driver core on events alone: no Ray, real MLflow (SQLite) and Optuna storage.

A `TrialRunner` is only built here (building one starts nothing); the events are the ones it would emit.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from labfleet.orchestration.events import (
    Action,
    ChunkResult,
    Evaluation,
    SeedEnded,
    SeedPlaced,
    SeedRecord,
    SeedRestored,
    SeedRetried,
    SeedStarted,
    Status,
    TrialEnded,
    TrialStarted,
)
from labfleet.orchestration.progress import ProgressBoard, ProgressListener
from labfleet.orchestration.recorder import FINAL_CHECKPOINT, LATEST_CHECKPOINT, MlflowRecorder
from labfleet.orchestration.runner import SeedState, TrialMeta, TrialRunner
from labfleet.spec.loading import resolve_spec_data
from labfleet.tracking.runs import Tracker

SPEC = {"name": "vi", "algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0, 1],
        "budget": {"iterations": 40}, "eval": {"episodes": 10, "every_steps": 10}, "tracking": {"experiment": "exp"}}


def _spec(**changes: object):
    return resolve_spec_data({**SPEC, **changes}, "vi.yaml", check_env=False)


def _runs(client: MlflowClient) -> dict[str, list]:
    experiment = client.get_experiment_by_name("exp")
    roles: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        roles.setdefault(run.data.tags["labfleet.role"], []).append(run)
    return roles


def _artifact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()


def test_recorder_writes_the_hierarchy_from_events(tracking_uri, tmp_path: Path):
    uri = tracking_uri
    tracker = Tracker(uri, background=True)
    recorder = MlflowRecorder(tracker)
    trial = TrialRunner(_spec(), [recorder], meta=TrialMeta(tags={"labfleet.spec_file": "vi.yaml"}))
    recorder.handle(TrialStarted(trial))
    for seed in (0, 1):
        recorder.handle(SeedStarted(trial, seed, 40))
    recorder.handle(SeedPlaced(trial, 0, {"node_id": "n1", "host": "h1", "device": "cpu"}))
    recorder.handle(SeedRetried(trial, 1, 1, "ActorDiedError"))
    recorder.handle(ChunkResult(trial, 0, [(10, {"eval/return_mean": 0.25}), (20, {"eval/return_mean": 0.5})],
                                {"media/a.txt": b"hello"}, 20, b"checkpoint-20", False, {}))
    recorder.handle(SeedEnded(trial, 0, Status.FINISHED, {"eval/return_mean": 0.5}, b"final"))
    recorder.handle(SeedEnded(trial, 1, Status.FAILED, error="boom"))
    recorder.handle(TrialEnded(trial, Status.FAILED, {"eval/return_mean": 0.5, "eval/return_mean_std": 0.0}, 40,
                               "seed 1: boom"))
    tracker.close()

    client = MlflowClient(uri)
    roles = _runs(client)
    (trial_run,) = roles["trial"]
    seeds = {r.data.tags["labfleet.seed"]: r for r in roles["seed"]}
    assert trial_run.info.run_id == recorder.trial_run_id(trial)
    assert trial_run.info.status == "FAILED" and trial_run.data.tags["labfleet.error"] == "seed 1: boom"
    assert trial_run.data.metrics == {"eval/return_mean": 0.5, "eval/return_mean_std": 0.0}
    assert trial_run.data.tags["labfleet.spec_file"] == "vi.yaml" and trial_run.data.params["seeds"] == "[0, 1]"
    assert {s.data.tags["mlflow.parentRunId"] for s in seeds.values()} == {trial_run.info.run_id}
    first, second = seeds["0"], seeds["1"]
    assert first.info.status == "FINISHED" and second.info.status == "FAILED"
    assert first.data.tags["labfleet.node"] == "n1" and second.data.tags["labfleet.retries"] == "1"
    history = client.get_metric_history(first.info.run_id, "eval/return_mean")
    assert [(m.step, m.value) for m in history] == [(10, 0.25), (20, 0.5)]
    assert _artifact(client, first.info.run_id, LATEST_CHECKPOINT, tmp_path / "a") == b"checkpoint-20"
    assert _artifact(client, first.info.run_id, FINAL_CHECKPOINT, tmp_path / "b") == b"final"
    assert _artifact(client, first.info.run_id, "media/a.txt", tmp_path / "c") == b"hello"
    assert first.data.params["seeds"] == "[0]" and first.data.tags["labfleet.config_hash"]


def test_recorder_ends_a_trial_interrupted_before_its_run_existed(tracking_uri, tmp_path: Path):
    """Ctrl-C inside the trial run's `create_run` (seen in a sweep): the session still stops the trial, whose
    seeds and trial then end without runs to end, and nothing raises."""
    uri = tracking_uri
    tracker = Tracker(uri, background=True)
    recorder = MlflowRecorder(tracker)
    trial = TrialRunner(_spec(), [recorder])
    for seed in (0, 1):
        recorder.handle(SeedEnded(trial, seed, Status.KILLED))
    recorder.handle(TrialEnded(trial, Status.KILLED, {}, 0))
    tracker.close()
    assert MlflowClient(uri).get_experiment_by_name("exp") is None  # nothing was written


def _started_trial(uri: str) -> tuple[Tracker, MlflowRecorder, TrialRunner]:
    """A recorder that has started a trial of two seeds (its runs RUNNING)."""
    tracker = Tracker(uri, background=True)
    recorder = MlflowRecorder(tracker)
    trial = TrialRunner(_spec(), [recorder])
    recorder.handle(TrialStarted(trial))
    for seed in (0, 1):
        recorder.handle(SeedStarted(trial, seed, 40))
    return tracker, recorder, trial


def test_recorder_continues_the_run_a_dead_driver_left(tracking_uri, tmp_path: Path):
    """The first recorder 'dies' (its runs stay RUNNING); a second one finds the unfinished trial with
    each seed's record, and the resumed events reopen the same runs."""
    uri = tracking_uri
    tracker, first, trial = _started_trial(uri)
    checkpoint = _checkpoint_bytes({"step": 10})  # a checkpoint is torch.save's archive (damage is checked)
    first.handle(ChunkResult(trial, 0, [(10, {"eval/return_mean": 0.25})], {}, 10, checkpoint, False, {}))
    first.handle(ChunkResult(trial, 1, [(40, {"eval/return_mean": 0.75})], {}, 40, None, True, {}))
    first.handle(SeedEnded(trial, 1, Status.FINISHED, {"eval/return_mean": 0.75}, b"final"))
    tracker.close()

    tracker = Tracker(uri, background=True)
    second = MlflowRecorder(tracker)
    again = TrialRunner(_spec(), [second])
    found = second.unfinished(again)
    assert found is not None
    run, records = found
    assert run.info.run_id == first.trial_run_id(trial)
    assert records[0] == SeedRecord(Status.RUNNING, checkpoint, {"eval/return_mean": 10},
                                    evals={10: {"eval/return_mean": 0.25}})
    assert records[1].status == Status.FINISHED and records[1].final == {"eval/return_mean": 0.75}
    second.handle(TrialStarted(again, resumed=True))
    second.handle(SeedStarted(again, 0, 40, records[0]))
    second.handle(SeedRestored(again, 1, records[1]))
    assert second.seed_run_id(again, 0) == first.seed_run_id(trial, 0)
    second.handle(ChunkResult(again, 0, [(20, {"eval/return_mean": 0.5})], {}, 20, None, False, {}, "approximate"))
    second.handle(SeedEnded(again, 0, Status.FINISHED, {"eval/return_mean": 0.5}, b"final"))
    second.handle(TrialEnded(again, Status.FINISHED, {"eval/return_mean": 0.625}, 40))
    tracker.close()

    roles = _runs(MlflowClient(uri))
    assert len(roles["trial"]) == 1 and len(roles["seed"]) == 2
    assert {r.info.status for rs in roles.values() for r in rs} == {"FINISHED"}
    (resumed,) = [r for r in roles["seed"] if r.data.tags["labfleet.seed"] == "0"]
    assert resumed.data.tags["labfleet.resumed_from"] == "checkpoint"
    assert resumed.data.tags["labfleet.resume"] == "approximate"  # how the restart from the checkpoint went
    # after success a rerun starts new runs
    assert MlflowRecorder(Tracker(uri)).unfinished(TrialRunner(_spec(), [])) is None


def _evaluated(recorder: MlflowRecorder, trial: TrialRunner, seed: int, step: int, value: float) -> None:
    """A chunk with one evaluation, as the runner delivers it: the chunk's record, then its Evaluation."""
    recorder.handle(ChunkResult(trial, seed, [(step, {"eval/return_mean": value})], {}, step, None, False, {}))
    recorder.handle(Evaluation(trial, seed, step, {"eval/return_mean": value}))


def _history(client: MlflowClient, run_id: str, name: str = "eval/return_mean") -> list[tuple[int, float]]:
    return [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run_id, name)]


def test_trial_run_carries_the_mean_over_seeds_history(tracking_uri, tmp_path: Path):
    """Each step every seed still in the trial has evaluated is logged once on the trial run, as soon as the
    last seed reaches it; a failed seed leaves the mean; the finals follow at the trial's last step."""
    uri = tracking_uri
    tracker = Tracker(uri, background=True)
    recorder = MlflowRecorder(tracker)
    trial = TrialRunner(_spec(seeds=[0, 1, 2]), [recorder])
    recorder.handle(TrialStarted(trial))
    for seed in (0, 1, 2):
        recorder.handle(SeedStarted(trial, seed, 40))
    run_id = recorder.trial_run_id(trial)
    client = MlflowClient(uri)
    for seed, value in ((0, 0.1), (1, 0.2)):
        _evaluated(recorder, trial, seed, 10, value)
    tracker.commit()
    tracker.drain()
    assert _history(client, run_id) == []  # seed 2 has not reached step 10
    _evaluated(recorder, trial, 2, 10, 0.6)
    _evaluated(recorder, trial, 0, 20, 0.5)
    _evaluated(recorder, trial, 1, 20, 0.7)
    tracker.commit()
    tracker.drain()
    assert _history(client, run_id) == [(10, 0.3)]
    recorder.handle(SeedEnded(trial, 2, Status.FAILED, error="boom"))  # step 20 is complete without it
    _evaluated(recorder, trial, 0, 30, 0.8)
    _evaluated(recorder, trial, 1, 30, 1.0)
    for seed, final in ((0, 0.8), (1, 1.0)):
        recorder.handle(SeedEnded(trial, seed, Status.FINISHED, {"eval/return_mean": final}, b"final"))
    recorder.handle(TrialEnded(trial, Status.FAILED, {"eval/return_mean": 0.9, "eval/return_mean_std": 0.1}, 30))
    tracker.close()
    assert _history(client, run_id) == [(10, 0.3), (20, 0.6), (30, 0.9)]  # the final mean is the last point
    assert _history(client, run_id, "eval/return_mean_std") == [(30, 0.1)]


def test_trial_history_continues_across_a_dead_driver(tracking_uri, tmp_path: Path):
    """A second driver gets each seed's earlier evaluations with its record: the step that a seed reached
    before the first driver died and the other after it is logged once, with both values."""
    uri = tracking_uri
    tracker, first, trial = _started_trial(uri)
    for seed, step, value in ((0, 10, 0.2), (1, 10, 0.4), (0, 20, 0.6)):
        _evaluated(first, trial, seed, step, value)
    tracker.close()  # the driver dies: the runs stay RUNNING

    tracker = Tracker(uri, background=True)
    second = MlflowRecorder(tracker)
    again = TrialRunner(_spec(), [second])
    found = second.unfinished(again)
    assert found is not None
    _, records = found
    second.handle(TrialStarted(again, resumed=True))
    for seed in (0, 1):
        second.handle(SeedStarted(again, seed, 40, records[seed]))
    _evaluated(second, again, 1, 20, 0.8)
    for seed, final in ((0, 0.6), (1, 0.8)):
        second.handle(SeedEnded(again, seed, Status.FINISHED, {"eval/return_mean": final}, b"final"))
    second.handle(TrialEnded(again, Status.FINISHED, {"eval/return_mean": 0.7, "eval/return_mean_std": 0.1}, 20))
    tracker.close()
    assert _history(MlflowClient(uri), first.trial_run_id(trial)) == [(10, 0.3), (20, 0.7)]


def test_progress_listener_draws_bars_from_events():
    out = io.StringIO()
    board = ProgressBoard(Console(file=out, force_terminal=False, width=200))
    listener = ProgressListener(board)
    trial = TrialRunner(_spec(seeds=[0]), [listener])
    with board:
        listener.handle(SeedStarted(trial, 0, 40))
        listener.handle(ChunkResult(trial, 0, [], {}, 20, None, False, {"eval/return_mean": 0.5}))
        listener.handle(SeedEnded(trial, 0, Status.FINISHED))
        listener.handle(SeedRestored(trial, 1, SeedRecord(Status.FINISHED)))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("vi seed=0: 20/40 (50%) eval/return_mean=0.5")
    assert lines[1] == "vi seed=0: FINISHED"
    assert lines[2].startswith("vi seed=1: 40/40 (100%)") and lines[3] == "vi seed=1: FINISHED"


def _searcher(tmp_path: Path, pruner: dict):
    from labfleet.orchestration.searcher import OptunaSearcher
    from labfleet.orchestration.session import DriverSession
    from labfleet.orchestration.study import check_sweep, create_study

    data = {**SPEC, "sweep": {"metric": "eval/return_mean", "direction": "maximize", "n_trials": 2, "max_parallel": 1,
                              "sampler": {"type": "random", "seed": 0}, "pruner": pruner,
                              "space": {"hparams.gamma": {"type": "float", "low": 0.5, "high": 0.99}}}}
    spec = resolve_spec_data(data, "vi.yaml", check_env=False)
    sweep = check_sweep(data, spec, "vi.yaml")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = create_study(sweep, "s", storage)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", background=True)
    session = DriverSession(tracker, Console(file=io.StringIO()), quiet=True)
    sweep_run = tracker.start_run("exp", "sweep", "s")
    return OptunaSearcher(session, study, data, spec, "vi.yaml", sweep, 2, sweep_run), tracker, storage


def _started(searcher) -> TrialRunner:
    (runner, records), *_ = searcher.more(0)
    assert records is None
    runner.status = Status.RUNNING
    runner.emit(TrialStarted(runner))
    for seed in runner.spec.seeds:
        runner.seeds[seed] = SeedState(seed, Status.RUNNING)
        runner.emit(SeedStarted(runner, seed, 40))
    return runner


def _evaluate(runner: TrialRunner, step: int, values: dict[int, float]):
    decision = None
    for seed, value in values.items():
        runner.seeds[seed].evals[step] = {"eval/return_mean": value}
        decision = runner.emit(Evaluation(runner, seed, step, {"eval/return_mean": value}))
    return decision


def test_searcher_prunes_on_the_mean_over_seeds_and_tells_pruned(tmp_path: Path):
    searcher, tracker, storage = _searcher(tmp_path, {"type": "threshold", "lower": 0.5})
    runner = _started(searcher)
    assert _evaluate(runner, 10, {0: 0.9}).action == Action.CONTINUE  # seed 1 has not reached step 10
    assert _evaluate(runner, 10, {1: 0.3}).action == Action.CONTINUE  # mean 0.6 >= 0.5
    decision = _evaluate(runner, 20, {0: 0.6, 1: 0.2})  # mean 0.4 < 0.5
    assert decision.action == Action.STOP and decision.status == Status.FINISHED and decision.reason == "pruned"
    runner.stop(decision.status, decision.reason, release=False)
    tracker.close()

    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {10: 0.6, 20: 0.4}
    client = MlflowClient(tracker.uri)
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial_run.info.status == "FINISHED" and trial_run.data.tags["optuna.state"] == "PRUNED"
    history = client.get_metric_history(trial_run.info.run_id, "intermediate/eval/return_mean")
    assert [(m.step, m.value) for m in history] == [(10, pytest.approx(0.6)), (20, pytest.approx(0.4))]


def test_searcher_tells_the_mean_of_the_final_values(tmp_path: Path):
    searcher, tracker, storage = _searcher(tmp_path, {"type": "nop"})
    runner = _started(searcher)
    for seed, final in ((0, 0.5), (1, 0.7)):
        state = runner.seeds[seed]
        state.status, state.final = Status.FINISHED, {"eval/return_mean": final}
        runner.emit(SeedEnded(runner, seed, Status.FINISHED, state.final))
    runner.status = Status.FINISHED
    runner.emit(TrialEnded(runner, Status.FINISHED, {"eval/return_mean": 0.6}, 40,
                           finals={0: {"eval/return_mean": 0.5}, 1: {"eval/return_mean": 0.7}}))
    assert searcher.finished == 1 and not searcher.active
    assert runner not in searcher.recorder.trials  # a told trial is let go (a long sweep's memory stays flat)
    tracker.close()
    assert searcher.untold == 0
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(0.6)
    run = MlflowClient(tracker.uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "COMPLETE" and run.info.status == "FINISHED"


def test_searcher_fails_a_finished_trial_without_its_objective(tmp_path: Path):
    searcher, tracker, storage = _searcher(tmp_path, {"type": "nop"})
    runner = _started(searcher)
    for seed in (0, 1):
        runner.seeds[seed].status, runner.seeds[seed].final = Status.FINISHED, {"eval/other": 1.0}
        runner.emit(SeedEnded(runner, seed, Status.FINISHED, {"eval/other": 1.0}))
    runner.status = Status.FINISHED
    runner.emit(TrialEnded(runner, Status.FINISHED, {}, 40, finals={0: {"eval/other": 1.0}, 1: {"eval/other": 1.0}}))
    tracker.close()
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.FAIL and "eval/return_mean" in trial.user_attrs["error"]
    run = MlflowClient(tracker.uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    assert searcher.streak.count == 1


def test_searcher_asks_no_new_trial_while_max_parallel_ended_trials_wait_for_their_tell(tmp_path: Path):
    """Backpressure: trials that end faster than the writer thread records them must not pile up untold
    (the queue would grow without end and the sampler would ask without their results)."""
    searcher, tracker, storage = _searcher(tmp_path, {"type": "nop"})  # max_parallel 1
    runner = _started(searcher)
    release = threading.Event()
    tracker.after_writes(release.wait, 30)  # the writer thread is busy until `release`
    for seed in runner.spec.seeds:
        state = runner.seeds[seed]
        state.status, state.final = Status.FINISHED, {"eval/return_mean": 0.5}
        runner.emit(SeedEnded(runner, seed, Status.FINISHED, state.final))
    runner.status = Status.FINISHED
    runner.emit(TrialEnded(runner, Status.FINISHED, {"eval/return_mean": 0.5}, 40,
                           finals={seed: {"eval/return_mean": 0.5} for seed in runner.spec.seeds}))
    assert searcher.untold == 1 and not searcher.active
    threading.Timer(0.5, release.set).start()
    start = time.monotonic()
    (second, _), = searcher.more(0)
    assert time.monotonic() - start >= 0.4, "a trial was asked while the last one was still untold"
    assert searcher.untold == 0
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    second.stop(Status.KILLED, release=False)
    tracker.close()


def test_trials_a_dead_driver_left_are_offered_even_when_they_fill_max_parallel(tmp_path: Path):
    """`adopt_running` puts the trials it takes back in `active` before they run: they must not count as
    running (with as many adopted as `max_parallel`, none was ever started and the sweep ended with them
    RUNNING)."""
    searcher, tracker, _ = _searcher(tmp_path, {"type": "nop"})  # max_parallel 1
    runner = searcher.ask()  # in `active`, as `adopt_running` leaves a trial it takes back
    assert runner is not None
    searcher.continuing.append((runner, {}))
    assert searcher.more(0) == [(runner, {})]
    assert searcher.more(1) == []  # now it runs, and fills max_parallel
    tracker.close()


def _checkpoint_bytes(state: dict) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
