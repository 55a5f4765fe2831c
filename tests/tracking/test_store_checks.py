"""The store checks that run before anything starts: a store another process is creating or migrating at
that moment is waited for, never refused as half-made; one a full disk left half-made is still refused."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labfleet.tracking.studies import storage_open_problem
from labfleet.tracking.uri import check_tracking_uri

MAKE_STORES = """
import sys, optuna
from mlflow.tracking import MlflowClient
MlflowClient(sys.argv[1]).search_experiments()
optuna.create_study(storage=sys.argv[2])
"""


@pytest.mark.slow
def test_stores_being_made_by_another_process_are_waited_for(tmp_path: Path) -> None:
    """A notebook opens the stores while a driver validates: every check the driver makes during the
    other process's migrations must pass (the store is fine a moment later)."""
    mlflow_uri, optuna_url = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    maker = subprocess.Popen([sys.executable, "-c", MAKE_STORES, mlflow_uri, optuna_url],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    problems, checks = [], 0
    while maker.poll() is None:
        checks += 1
        problems += [p for p in (check_tracking_uri(mlflow_uri), storage_open_problem(optuna_url)) if p]
    assert maker.returncode == 0, maker.communicate()[0]
    assert checks > 0
    assert not problems, problems
    assert check_tracking_uri(mlflow_uri) is None and storage_open_problem(optuna_url) is None


def test_a_store_left_half_made_is_still_refused_after_a_quiet_moment(tmp_path: Path) -> None:
    store = tmp_path / "half.db"
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("CREATE TABLE experiments (x)")
        db.execute("CREATE TABLE alembic_version (version_num)")
        db.execute("INSERT INTO alembic_version VALUES ('0123abcd')")
        db.commit()
    started = time.monotonic()
    problem = check_tracking_uri(f"sqlite:///{store}")
    assert problem and "0123abcd" in problem and "mlflow db upgrade" in problem
    assert time.monotonic() - started < 30
