"""rliable-style aggregates (issue 16 section 3): exact values on hand-built scores, the stratified
bootstrap, and the report's section on a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from labfleet.reporting import aggregate


def test_iqm_is_the_mean_of_the_middle_half():
    assert float(aggregate.iqm(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]))) == pytest.approx(3.5)


def test_probability_of_improvement_counts_pairs_and_half_ties():
    x = {"a": np.array([1.0, 2.0, 3.0])}
    y = {"a": np.array([2.0, 2.0, 0.0])}
    # x > y: (1, 0), (2, 0), (3, 2), (3, 2), (3, 0) = 5; ties (2, 2) twice = 1; of 9 pairs
    assert aggregate.probability_of_improvement(x, y) == pytest.approx(6 / 9)
    assert aggregate.probability_of_improvement(y, x) == pytest.approx(3 / 9)
    # Averaged over the tasks both have (task "b" of x alone is left out)
    x2 = {**x, "b": np.array([5.0]), "c": np.array([1.0, 1.0])}
    y2 = {**y, "c": np.array([0.0, 0.0])}
    assert aggregate.probability_of_improvement(x2, y2) == pytest.approx((6 / 9 + 1.0) / 2)


def test_performance_profile_and_normalisation():
    scores = {"m": {"t1": np.array([0.0, 5.0, 10.0]), "t2": np.array([-1.0])},
              "n": {"t1": np.array([2.0]), "t2": np.array([1.0, 3.0])}}
    ranges = aggregate.task_ranges(scores)
    assert ranges == {"t1": (0.0, 10.0), "t2": (-1.0, 3.0)}
    norm = aggregate.normalise(scores, ranges, lower_is_better=False)
    np.testing.assert_allclose(norm["m"]["t1"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(norm["n"]["t2"], [0.5, 1.0])
    flipped = aggregate.normalise(scores, ranges, lower_is_better=True)
    np.testing.assert_allclose(flipped["m"]["t1"], [1.0, 0.5, 0.0])
    profile = aggregate.performance_profile(norm["m"], np.array([-0.1, 0.25, 0.5, 1.0]))
    np.testing.assert_allclose(profile, [1.0, 2 / 4, 1 / 4, 0.0])  # runs 0, 0.5, 1 (t1) and 0 (t2)


def test_the_bootstrap_is_stratified_by_task():
    """Task "a" runs are all 0, task "b" runs all 10: a stratified resample always holds 3 of each, so
    every bootstrap mean is exactly 5; a pooled bootstrap would spread."""
    per_task = {"a": np.zeros(3), "b": np.full(3, 10.0)}
    estimate = aggregate.interval(per_task, np.mean, n_resamples=500)
    assert (estimate.point, estimate.low, estimate.high) == (5.0, 5.0, 5.0)
    spread = aggregate.interval({"a": np.array([0.0, 1.0, 2.0, 3.0, 10.0])}, np.mean)
    assert spread.low < 3.2 < spread.high
    single = aggregate.interval({"a": np.array([1.0])}, np.mean)
    assert single.point == 1.0 and np.isnan(single.low)


@pytest.mark.slow
def test_the_report_gives_iqm_profiles_and_improvement(tracking_uri, tmp_path: Path):
    """Two configurations on one task, 4 seeds each, written to a real SQLite store and reported."""
    from labfleet.reporting.report import build_report
    from labfleet.tracking.runs import Tracker

    store = tracking_uri
    tracker = Tracker(store)
    suite = tracker.start_run("agg", "suite", "agg")
    finals = {"good": [9.0, 10.0, 11.0, 30.0], "bad": [1.0, 2.0, 3.0, 9.0]}
    for label, values in finals.items():
        trial = tracker.start_run("agg", "trial", label, suite, tags={"labfleet.algorithm": "ppo",
                                                                         "labfleet.env": "CartPole-v1"})
        for seed, value in enumerate(values):
            run = tracker.start_run("agg", "seed", f"{label}-{seed}", trial, tags={"labfleet.seed": str(seed)})
            tracker.log_metrics(run, {"eval/return_mean": value}, 100)
            tracker.end_run(run, "FINISHED")
        tracker.log_metrics(trial, {"eval/return_mean": float(np.mean(values))}, 100)
        tracker.end_run(trial, "FINISHED")
    tracker.end_run(suite, "FINISHED")
    tracker.close()
    report = build_report(MlflowClient(store), "agg", tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Aggregate statistics" in text
    section = text.split("## Aggregate statistics")[1]
    good = next(line for line in section.splitlines() if line.startswith("| good | 4 |"))
    assert good.split("|")[3].strip() == "10.5"  # IQM of 9, 10, 11, 30: mean of 10 and 11
    # P(good > bad): of 16 pairs, 9 > 9 ties once (0.5), every other good run beats every bad one but 9 vs 9
    row = next(line for line in section.splitlines() if line.startswith("| good | ") and line.count("|") == 4)
    assert row.split("|")[3].strip() == f"{(15 + 0.5) / 16:.2f}"
    assert (tmp_path / "out" / "profiles.png").read_bytes()[:4] == b"\x89PNG"
    assert "Aggregate statistics" in (tmp_path / "out" / "report.html").read_text()
    assert report.rows


def test_a_large_sweep_reports_its_best_methods_only():
    rng = np.random.default_rng(0)
    scores = {f"trial={i}": {"t": rng.normal(i, 1.0, 3)} for i in range(50)}
    text = aggregate.aggregate_markdown(scores, False, None, "eval/return_mean")
    rows = [line for line in text.splitlines() if line.startswith("| trial=")]
    assert "The 20 best of 50 methods by IQM." in text
    assert len(rows) == 20 + 10 and rows[0].startswith("| trial=49 |")  # 20 table rows, 10 matrix rows
