"""What a new user sees first (issue 17): --version and -h, output without library noise, experiments that
MLflow 3 opens on runs, and reruns of a spec told apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

VI = {"name": "vi", "algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0],
      "budget": {"iterations": 20}, "eval": {"episodes": 20}, "tracking": {"experiment": "first-hour"}}


@pytest.mark.slow
def test_version_and_short_help(tmp_path: Path):
    import labfleet

    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"labfleet {labfleet.__version__}"
    short = run_cli("-h", cwd=tmp_path)
    assert short.returncode == 0 and "Commands" in short.stdout and "reconcile" in short.stdout
    run_help = run_cli("run", "-h", cwd=tmp_path)
    assert run_help.returncode == 0 and "--fresh" in run_help.stdout


@pytest.mark.slow
def test_runs_are_quiet_open_as_training_runs_and_reruns_are_told_apart(tmp_path: Path):
    tracking_uri = f"sqlite:///{tmp_path / 'new-store.db'}"  # created by the first run (its log lines hidden)
    spec = tmp_path / "vi.yaml"
    spec.write_text(yaml.safe_dump(VI))
    outputs = []
    for _ in range(2):
        result = run_cli("run", str(spec), "--tracking-uri", tracking_uri, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout + result.stderr)
    for output in outputs:
        assert "Token authentication" not in output, output
        assert "INFO mlflow" not in output and "Creating initial MLflow database tables" not in output, output
        assert "Warning" not in output, output  # e.g. torch's FutureWarnings, once printed at every exit
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("first-hour")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not GenAI's "Traces" view
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    trial_names = [r.data.tags["mlflow.runName"] for r in runs if r.data.tags["labfleet.role"] == "trial"]
    seed_names = [r.data.tags["mlflow.runName"] for r in runs if r.data.tags["labfleet.role"] == "seed"]
    assert sorted(trial_names) == ["vi", "vi #2"]
    assert sorted(seed_names) == ["vi #2/seed=0", "vi/seed=0"]
    verbose = run_cli("--verbose", "validate", str(spec), cwd=tmp_path)
    assert verbose.returncode == 0
