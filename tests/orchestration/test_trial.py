"""The trial worker in-process: windowed training metrics, evaluations at their exact steps."""

from __future__ import annotations

import pytest

from labfleet.orchestration.trial import CURVE_POINTS, MetricWindow, TrialWorker
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


def test_metric_window_averages_and_keeps_last_counters():
    window = MetricWindow(width=3)
    assert window.add(1, 1, {"loss/value": 1.0, "time/env_steps": 1}) is None
    assert window.add(2, 2, {"loss/value": 2.0, "time/env_steps": 2}) is None
    step, means = window.add(3, 3, {"loss/value": 6.0, "time/env_steps": 3})
    assert step == 3 and means == {"loss/value": 3.0, "time/env_steps": 3}
    assert window.add(4, 4, {"loss/value": 5.0}) is None
    assert window.flush(4) == (4, {"loss/value": 5.0})
    assert window.flush(5) is None


@pytest.mark.slow
def test_many_small_iterations_give_a_bounded_curve_and_exact_evaluations():
    spec = load_spec(EXPERIMENTS / "cartpole_reinforce.yaml", {
        "budget.env_steps": 5000, "hparams.n_envs": 1, "hparams.n_steps": 1, "seeds": [0],
        "eval": {"episodes": 2, "every_steps": 1000}})
    worker = TrialWorker(spec.model_dump(mode="json"), 0)
    result = worker.advance(seconds=120)
    assert result.done
    training = [(step, values) for step, values in result.records if "loss/policy" in values]
    evals = [step for step, values in result.records if "eval/return_mean" in values]
    assert len(training) <= CURVE_POINTS + 1  # 5000 iterations, averaged in windows of 10 steps
    assert len(training) >= CURVE_POINTS - 1
    assert evals == [1000, 2000, 3000, 4000, 5000]
    assert [s for s, _ in training] == sorted(s for s, _ in training)
    assert training[-1][1]["time/env_steps"] == pytest.approx(5000)


def test_the_wire_is_frozen_and_survives_pickling():
    import dataclasses
    import pickle

    from labfleet.orchestration.wire import GroupChunk, SeedChunk, SeedFailed

    chunk = GroupChunk({3: SeedChunk([(10, {"loss/policy": 0.5})], 10, False, b"ckpt", None, {"a.png": b"x"}, "exact",
                                     0.2), 4: SeedFailed("ValueError: boom")})
    assert pickle.loads(pickle.dumps(chunk)) == chunk
    with pytest.raises(dataclasses.FrozenInstanceError):
        chunk.seeds[3].done = True  # type: ignore[misc]
