"""The Python API as a notebook uses it: docs/python-api.md's example, run as it stands in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXPERIMENTS, REPO

CHECKS = '''
# (the test's own checks, after the example)
import labfleet as lf
assert {"run", "sweep", "suite", "results", "load", "Result", "SpecError", "Trainer"} <= set(dir(lf))
assert isinstance(result, lf.Result) and result.exit_code == 0 and len(result.run_ids) == 1
assert list(table.columns[:9]) == ["experiment", "configuration", "config_hash", "algorithm", "task", "seed",
                                   "state", "trial_run_id", "run_id"]
assert sorted(table.seed) == [0, 1] and set(table.state) == {"FINISHED"} and set(table.task) == {"FrozenLake-v1"}
assert set(table.trial_run_id) == set(result.run_ids) and table["eval/return_mean"].between(0, 1).all()
assert len(everything) == 3 and everything.run_id.is_unique  # before the sweep: two configurations, 3 seeds
assert len(labfleet.results(sweep)) == 2 and sweep.ok
print("CHECKS PASSED")
'''


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path: Path):
    text = (REPO / "docs" / "python-api.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, re.S)
    (tmp_path / "experiments").symlink_to(EXPERIMENTS)
    (tmp_path / "example.py").write_text(example + CHECKS)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "CHECKS PASSED" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hparams.gamma: Input should be less than 1" in done.stdout  # the SpecError's problem, printed
    assert "Traceback" not in done.stderr
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "optuna.db").exists()


def test_results_refuses_a_store_that_does_not_exist(tmp_path: Path):
    import labfleet

    with pytest.raises(labfleet.SpecError, match="no MLflow store"):
        labfleet.results("anything", tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()
