"""`labfleet report` and `labfleet ui` on real stores: a suite of two configurations x 3 seeds and a sweep,
trained for real, read back with MlflowClient; the HTML rendered by headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from labfleet.reporting.report import _fmt
from tests.conftest import free_ports, interrupt_group, run_cli

VI = {"algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0, 1, 2], "budget": {"iterations": 40},
      "eval": {"episodes": 200, "every_steps": 10}}


@pytest.fixture(scope="module")
def suite_store(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "vi.yaml").write_text(yaml.safe_dump({"name": "vi", **VI}))
    (tmp / "suite.yaml").write_text(yaml.safe_dump({"name": "two-gammas", "experiments": [
        {"spec": "vi.yaml", "set": {"name": "vi-low", "hparams": {"gamma": 0.5}}},
        {"spec": "vi.yaml", "set": {"name": "vi-high", "hparams": {"gamma": 0.99}}}]}))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = run_cli("suite", str(tmp / "suite.yaml"), "--tracking-uri", uri, "--quiet", cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, uri


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    if os.environ.get("CI") == "true":
        raise AssertionError("CI needs Chromium (.ci/run installs Debian's chromium)")
    pytest.skip("no Chromium to render the report")


@pytest.mark.slow
def test_report_on_a_suite(suite_store):
    tmp, uri = suite_store
    out = tmp / "out"
    result = run_cli("report", "two-gammas", "--tracking-uri", uri, "--out", str(out), "--log", cwd=tmp,
                     env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the terminal's table: configuration, n, state and the primary metric, within 80 columns, nothing cut
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in result.stdout, result.stdout
    heads = next(line for line in lines if "configuration" in line)
    assert [h.strip() for h in heads.replace("┃", "|").replace("│", "|").split("|") if h.strip()] == [
        "configuration", "n", "state", "eval/return_mean"], heads
    assert any("vi-high" in line and "finished" in line for line in lines), result.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("two-gammas")
    trials = {r.data.tags["mlflow.runName"]: r for r in
              client.search_runs([exp.experiment_id], "tags.`labfleet.role` = 'trial'")}
    table = (out / "results.md").read_text()
    main = table.split("## Aggregate statistics")[0]  # the aggregate section follows (test_aggregate.py)
    rows = [line for line in main.splitlines() if line.startswith("| vi-")]
    assert [r.split("|")[1].strip() for r in rows] == ["vi-high", "vi-low"], "best first"
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        metrics = trials[cells[0]].data.metrics
        assert cells[1] == "3"
        assert cells[2] == f"{_fmt(metrics['eval/return_mean'])} ± {_fmt(metrics['eval/return_mean_std'])}"

    # CSV beside the Markdown: every seed's curve, equal to its MLflow history, and the results table
    import csv

    points = list(csv.DictReader((out / "curves.csv").read_text().splitlines()))
    seeds = client.search_runs([exp.experiment_id], "tags.`labfleet.role` = 'seed'")
    assert {p["run_id"] for p in points} == {s.info.run_id for s in seeds}
    for seed in seeds:
        history = sorted((m.step, m.value) for m in client.get_metric_history(seed.info.run_id, "eval/return_mean"))
        assert [(int(p["step"]), float(p["value"])) for p in points if p["run_id"] == seed.info.run_id] == history
    results = {r["configuration"]: r for r in csv.DictReader((out / "results.csv").read_text().splitlines())}
    assert float(results["vi-high"]["eval/return_mean"]) == trials["vi-high"].data.metrics["eval/return_mean"]
    assert "standard deviation" in table

    (suite_run,) = client.search_runs([exp.experiment_id], "tags.`labfleet.role` = 'suite'")
    logged = {a.path for a in client.list_artifacts(suite_run.info.run_id, "report")}
    assert {"report/curves.png", "report/results.md", "report/report.html"} <= logged

    browser = _chromium()
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-images-rendered="2"' in dom, dom[-2000:]  # the curves and the performance profiles
    assert "Probability of improvement" in dom
    assert "vi-high" in dom and "<table" in dom


@pytest.mark.slow
def test_report_on_a_sweep_has_optuna_figures(tracking_uri, tmp_path: Path):
    spec = {"name": "vi-sweep", **VI, "seeds": [0], "sweep": {
        "n_trials": 4, "max_parallel": 2, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "nop"},
        "space": {"hparams.gamma": {"type": "float", "low": 0.3, "high": 0.99},
                  "hparams.tolerance": {"type": "float", "low": 1e-10, "high": 1e-4, "log": True}}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    uri, storage = tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("sweep", "sweep.yaml", "--tracking-uri", uri, "--storage", storage, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    result = run_cli("report", "vi-sweep", "--tracking-uri", uri, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("curves", "optimization_history", "param_importances", "parallel_coordinate"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    main = (out / "results.md").read_text().split("## Aggregate statistics")[0]
    assert len([line for line in main.splitlines() if "vi-sweep/trial=" in line]) == 4
    trials = (out / "results.md").read_text().split("## Trials")[1]  # each trial's sampled values and state
    assert "| trial | state | hparams.gamma | hparams.tolerance |" in trials
    assert sum("| COMPLETE |" in line for line in trials.splitlines()) == 4

    # A large sweep's seed runs are read in one paged search, not one search per trial: the same runs.
    from labfleet.reporting import report

    client = MlflowClient(uri)
    target = report.resolve_target(client, "vi-sweep")
    bulk = report._configurations(client, target.experiment_id, [c.trial for c in target.configurations],
                                  bulk_above=0)
    assert [[s.info.run_id for s in c.seeds] for c in bulk] == \
        [[s.info.run_id for s in c.seeds] for c in target.configurations]
    assert all(len(c.seeds) == 1 for c in bulk)
    # ... and its curves are those of its best configurations, in trial order
    best = report.best_configurations(target.configurations, "eval/return_mean", 2)
    finals = sorted((c.trial.data.metrics["eval/return_mean"] for c in target.configurations), reverse=True)
    assert sorted(c.trial.data.metrics["eval/return_mean"] for c in best) == sorted(finals[:2])
    assert [c.label for c in best] == [c.label for c in target.configurations if c in best]


@pytest.mark.slow
def test_report_bad_target_and_missing_store(tmp_path: Path, suite_store):
    _, uri = suite_store
    result = run_cli("report", "no-such-thing", "--tracking-uri", uri, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2 and "no-such-thing" in result.stderr and "two-gammas" in result.stderr
    missing = tmp_path / "missing.db"
    result = run_cli("report", "x", "--tracking-uri", f"sqlite:///{missing}", cwd=tmp_path)
    assert result.returncode == 2 and "no MLflow store" in result.stderr
    assert not missing.exists() and not (tmp_path / "o").exists()
    result = run_cli("ui", "--tracking-uri", uri, "--experiment", "no-such-experiment", cwd=tmp_path)
    assert result.returncode == 2 and "no experiment 'no-such-experiment'" in result.stderr, result.stderr
    assert "'two-gammas'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_and_stops(suite_store):
    tmp, uri = suite_store
    (port,) = free_ports()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "labfleet", "ui", "--tracking-uri", uri, "--port", str(port)],
                            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != 200:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.5)
        assert status == 200
        # the store's URI (which may hold a password) reaches `mlflow server` through its environment, never
        # through a command line that `ps` shows every user
        import psutil

        lines = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)]
        assert any("mlflow" in line for line in lines) and not any(uri in line for line in lines), lines
        # the experiment the suite wrote is what this UI serves
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?"
                                    f"experiment_name=two-gammas", timeout=10) as response:
            assert response.status == 200 and b"two-gammas" in response.read()
        output = interrupt_group(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert re.search(rf"MLflow UI: http://127\.0\.0\.1:{port}", output)
    # the runs page of the experiment the suite wrote (MLflow 3's experiment page opens on GenAI traces)
    experiment_id = MlflowClient(uri).get_experiment_by_name("two-gammas").experiment_id
    assert f"Runs of two-gammas: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs" in output, output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


@pytest.mark.slow
def test_report_is_read_only_without_log(suite_store, tmp_path: Path):
    """Run on a copy of the store, the report writes nothing into either store (MLflow records artifact
    locations as absolute paths, so a write would land beside the original)."""
    tmp, uri = suite_store
    copy = tmp_path / "copy.db"
    shutil.copy(Path(uri.removeprefix("sqlite:///")), copy)

    def files() -> list:
        return sorted((str(p.relative_to(tmp)), p.stat().st_mtime_ns) for p in tmp.rglob("*")
                      if p.is_file() and "out" not in p.relative_to(tmp).parts)

    before, copy_bytes = files(), copy.read_bytes()
    result = run_cli("report", "two-gammas", "--tracking-uri", f"sqlite:///{copy}", "--out", str(tmp_path / "r"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "r" / "report.html").exists() and "Logged as artifacts" not in result.stdout
    assert files() == before, "the report wrote into the original store's directory"
    assert copy.read_bytes() == copy_bytes, "the report wrote into the store it read"


@pytest.mark.slow
def test_report_refuses_an_unknown_metric(suite_store, tmp_path: Path):
    tmp, uri = suite_store
    result = run_cli("report", "two-gammas", "--tracking-uri", uri, "--metric", "eval/retrun_mean",
                     "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "labfleet report: --metric: no run of" in result.stderr
    assert "did you mean 'eval/return_mean'?" in result.stderr and "vi/bellman_residual" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_bands_stay_in_the_observed_range_and_one_seed_ranks_last(tracking_uri, suite_store, tmp_path: Path):
    """Issue 17: a 1-seed 475.9 must not rank above 378.5 +- 155.1 over 3 seeds, and a band never leaves
    the range the seeds reached (a t-interval over 3 capped returns ran from -100 to 2000)."""
    from labfleet.reporting.report import curve, final_rows, resolve_target
    from labfleet.tracking.runs import Tracker

    tmp, uri = suite_store
    client = MlflowClient(uri)
    for config in resolve_target(client, "two-gammas").configurations:
        steps, mean, low, high, n, interpolated = curve(client, config, "eval/return_mean")
        assert not interpolated  # every seed evaluated at the same steps
        assert n == 3 and len(steps) >= 2
        observed = [[m.value for m in client.get_metric_history(s.info.run_id, "eval/return_mean")
                     if m.step in set(steps)] for s in config.seeds]
        assert (low >= np.min(observed, axis=0) - 1e-12).all() and (high <= np.max(observed, axis=0) + 1e-12).all()
        assert (low <= mean).all() and (mean <= high).all()

    store = tracking_uri
    tracker = Tracker(store)
    for label, values in (("one-seed", [475.9]), ("three-seeds", [500.0, 460.0, 175.5])):
        trial = tracker.start_run("ranks", "trial", label, tags={"labfleet.algorithm": "ppo"})
        for i, value in enumerate(values):
            seed = tracker.start_run("ranks", "seed", f"{label}/seed={i}", trial, tags={"labfleet.seed": str(i)})
            tracker.log_metrics(seed, {"eval/return_mean": value}, 100)
            tracker.end_run(seed, "FINISHED")
        tracker.log_metrics(trial, {"eval/return_mean": float(np.mean(values)),
                                    "eval/return_mean_std": float(np.std(values))}, 100)
        tracker.end_run(trial, "FINISHED")
    tracker.close()
    ranked = MlflowClient(store)
    _, rows = final_rows(resolve_target(ranked, "ranks").configurations, "eval/return_mean")
    assert [(r["configuration"], r["seeds"]) for r in rows] == [("three-seeds", 3), ("one-seed", 1)]


def test_reruns_of_a_configuration_pool_and_seeds_share_a_grid(tracking_uri, tmp_path: Path):
    """Trial runs of one config hash are one configuration (a 1-seed and a 3-seed run of a spec: 3 seeds, seed 0
    counted once); seeds that evaluated at different steps are drawn on a common grid; one colour each."""
    from labfleet.reporting.report import build_report, curve, final_rows, resolve_target
    from labfleet.tracking.runs import Tracker

    store = tracking_uri
    tracker = Tracker(store)
    runs = (("spec", "h1", {0: {10: 1.0, 20: 2.0}}),
            ("spec #2", "h1", {0: {10: 1.0, 20: 2.0}, 1: {15: 3.0, 25: 5.0}, 2: {10: 2.0, 20: 4.0, 30: 6.0}}),
            ("other", "h2", {0: {10: 0.5}}))
    for label, config_hash, seeds in runs:
        tags = {"labfleet.algorithm": "ppo", "labfleet.env": "CartPole-v1", "labfleet.config_hash": config_hash}
        trial = tracker.start_run("pool", "trial", label, tags=tags)
        for seed, history in seeds.items():
            run = tracker.start_run("pool", "seed", f"{label}/seed={seed}", trial, tags={**tags, "labfleet.seed":
                                                                                         str(seed)})
            for step, value in history.items():
                tracker.log_metrics(run, {"eval/return_mean": value}, step)
            tracker.end_run(run, "FINISHED")
        tracker.end_run(trial, "FINISHED")
    tracker.close()
    client = MlflowClient(store)
    configs = resolve_target(client, "pool").configurations
    assert [(c.label, len(c.seeds), c.color) for c in configs] == [("spec", 3, 0), ("other", 1, 1)]
    _, rows = final_rows(configs, "eval/return_mean")
    pooled = next(r for r in rows if r["configuration"] == "spec")
    assert pooled["seeds"] == 3 and pooled["eval/return_mean"][0] == pytest.approx((2.0 + 5.0 + 6.0) / 3)
    steps, mean, _, _, n, interpolated = curve(client, configs[0], "eval/return_mean")
    assert interpolated and n == 3 and list(steps) == [15, 20]  # the steps within the range every seed covers
    assert mean[0] == pytest.approx((1.5 + 3.0 + 3.0) / 3)
    one = curve(client, configs[1], "eval/return_mean")
    assert list(one[0]) == [10] and one[4] == 1  # a one-point curve is still drawn (with a marker)
    report = build_report(client, "pool", tmp_path / "out")
    lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("spec,3,FINISHED") and report.files


def test_a_report_over_several_tasks_draws_a_panel_each(tracking_uri, tmp_path: Path):
    from labfleet.reporting.report import markdown_table, panels, resolve_target
    from labfleet.tracking.runs import Tracker

    store = tracking_uri
    tracker = Tracker(store)
    suite = tracker.start_run("mixed", "suite", "mixed")
    for label, env, algorithm, value in (("ppo", "CartPole-v1", "ppo", 500.0), ("ddpg", "Pendulum-v1", "ddpg", -150.0),
                                         ("vi", "FrozenLake-v1", "value_iteration", 0.74)):
        trial = tracker.start_run("mixed", "trial", label, suite, tags={"labfleet.algorithm": algorithm,
                                                                         "labfleet.env": env})
        tracker.log_metrics(trial, {"eval/return_mean": value, "eval/return_mean_std": 0.0}, 10)
        tracker.end_run(trial, "FINISHED")
    tracker.close()
    target = resolve_target(MlflowClient(store), "mixed")
    assert sorted(task for task, _, _ in panels(target.configurations, None)) == [
        "CartPole-v1", "FrozenLake-v1", "Pendulum-v1"]
    from labfleet.reporting.report import final_rows

    names, rows = final_rows(target.configurations, "eval/return_mean")
    table = markdown_table(names, rows)
    assert "| configuration | task | seeds |" in table
    assert [r["task"] for r in rows] == ["CartPole-v1", "FrozenLake-v1", "Pendulum-v1"]


@pytest.mark.parametrize("tag", ["sqlite:///{dir}/planted/optuna.db", "journal:{dir}/planted/study.log"])
def test_report_opens_a_tagged_storage_read_only_and_never_shows_a_password(tmp_path: Path, tracking_uri: str,
                                                                              tag: str) -> None:
    """A sweep run whose `optuna.storage` tag names a file that does not exist: the report creates nothing
    there; a `--storage` with a password that cannot be opened leaves the password out of every file."""
    from mlflow.entities import Metric
    from typer.testing import CliRunner

    from labfleet.cli import app

    (tmp_path / "planted").mkdir()
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("planted")
    sweep = client.create_run(experiment, tags={"labfleet.role": "sweep", "mlflow.runName": "st",
                                                "optuna.study_name": "st",
                                                "optuna.storage": tag.format(dir=tmp_path)}).info.run_id
    trial = client.create_run(experiment, tags={"labfleet.role": "trial", "mlflow.parentRunId": sweep,
                                                "mlflow.runName": "st/trial=0"}).info.run_id
    seed = client.create_run(experiment, tags={"labfleet.role": "seed", "mlflow.parentRunId": trial,
                                               "labfleet.seed": "0", "labfleet.algorithm": "ppo"}).info.run_id
    client.log_batch(seed, [Metric("eval/return_mean", float(i), 0, i) for i in range(3)])
    for run_id in (seed, trial, sweep):
        client.set_terminated(run_id)
    runner = CliRunner()
    first = runner.invoke(app, ["report", "st", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert list((tmp_path / "planted").iterdir()) == [], "the report created the file a tag named"
    assert "could not open study" in (tmp_path / "a" / "report.html").read_text()
    second = runner.invoke(app, ["report", "st", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "b"),
                                 "--storage", "postgresql://u:S3CRETPW@127.0.0.1:1/db"])
    assert second.exit_code == 0, second.output
    assert "S3CRETPW" not in second.output
    for file in (tmp_path / "b").iterdir():
        assert b"S3CRETPW" not in file.read_bytes(), f"{file.name} holds the password"


def test_a_report_on_generative_runs_shows_their_latest_sample_grids(tracking_uri, tmp_path: Path):
    from labfleet.algorithms.generative.plots import image_grid_png
    from labfleet.reporting.report import build_report
    from labfleet.tracking.runs import Tracker

    store = tracking_uri
    tracker = Tracker(store)
    suite = tracker.start_run("gen", "suite", "gen")
    grids = {}
    for label, algorithm in (("fm-vae", "vae"), ("fm-gan", "gan")):
        trial = tracker.start_run("gen", "trial", label, suite, tags={"labfleet.algorithm": algorithm})
        seed = tracker.start_run("gen", "seed", f"{label}/seed=0", trial, tags={"labfleet.algorithm": algorithm})
        for step, shade in ((10, 0.2), (20, 0.9)):  # the report shows the last grid
            grid = image_grid_png(np.full((4, 1, 8, 8), shade), f"{label} {step}")
            tracker.log_bytes(seed, f"samples/step_{step:08d}.png", grid)
            grids[label] = grid
        tracker.log_metrics(seed, {"eval/neg_elbo": 1.0, "eval/fd": 2.0}, 20)
        tracker.log_metrics(trial, {"eval/neg_elbo": 1.0, "eval/fd": 2.0}, 20)
        for run in (seed, trial):
            tracker.end_run(run, "FINISHED")
    tracker.close()
    report = build_report(MlflowClient(store), "gen", tmp_path / "out")
    for label in ("fm-vae", "fm-gan"):
        assert (tmp_path / "out" / f"samples_{label}.png").read_bytes() == grids[label]
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<figure>") >= 2 and "samples fm-vae" in page
    assert report.files


def test_cross_task_aggregates_compare_methods_on_the_tasks_they_share(tracking_uri, tmp_path: Path):
    from labfleet.reporting.report import aggregate_section, resolve_target
    from labfleet.tracking.runs import Tracker

    store = tracking_uri
    tracker = Tracker(store)
    for experiment, cells in (("some", (("ppo", "CartPole-v1"), ("ppo", "Acrobot-v1"), ("dqn", "CartPole-v1"))),
                              ("none", (("ppo", "CartPole-v1"), ("ddpg", "Pendulum-v1")))):
        for algorithm, env in cells:
            tags = {"labfleet.algorithm": algorithm, "labfleet.env": env, "labfleet.config_hash": algorithm + env}
            trial = tracker.start_run(experiment, "trial", f"{algorithm}-{env}", tags=tags)
            for seed in range(3):
                run = tracker.start_run(experiment, "seed", f"s{seed}", trial,
                                        tags={**tags, "labfleet.seed": str(seed)})
                tracker.log_metrics(run, {"eval/return_mean": 10.0 * seed + len(env)}, 100)
                tracker.end_run(run, "FINISHED")
            tracker.end_run(trial, "FINISHED")
    tracker.close()
    client = MlflowClient(store)
    text, figure = aggregate_section(resolve_target(client, "some").configurations, "eval/return_mean")
    assert "Aggregated over the tasks every method ran (CartPole-v1); left out: Acrobot-v1." in text
    assert "| dqn |" in text and "| ppo |" in text and figure is not None
    text, figure = aggregate_section(resolve_target(client, "none").configurations, "eval/return_mean")
    assert text.startswith("No task was run by every method") and figure is None and "nan" not in text
