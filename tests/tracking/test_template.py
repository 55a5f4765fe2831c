"""New SQLite stores as copies of a migrated template (tracking/template.py): the same store MLflow makes
itself, the default experiment where MLflow would put it, never a store replaced, and MLflow's own way
wherever the template cannot be had."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from labfleet.tracking import template


def _schema(path: Path) -> list[tuple[str, ...]]:
    """Each table's and index's definition, its lines sorted: MLflow's own migrations write a table's
    constraints in an order that changes from one process to the next (they come from a set)."""
    with contextlib.closing(sqlite3.connect(str(path))) as db:
        rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return sorted((kind, name, table, "\n".join(sorted((sql or "").replace(",", "").splitlines())))
                  for kind, name, table, sql in rows)


def _experiments(path: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(str(path))) as db:
        return sorted(db.execute("SELECT experiment_id, name, artifact_location FROM experiments"))


OPEN_STORE = """
import sys
from labfleet.tracking.runs import Tracker
Tracker(sys.argv[1]).check()
print("seeded" if sys.argv[2] == "labfleet" else "")
"""

MLFLOW_ALONE = """
import sys
from mlflow.tracking import MlflowClient
MlflowClient(sys.argv[1]).search_experiments()
"""


@pytest.mark.slow
def test_a_store_from_the_template_is_the_store_mlflow_makes(tmp_path: Path, monkeypatch):
    """Each made in a directory of its own (the default experiment's location names it): the same schema,
    the same migration version, the same experiments; the second new store costs no migration."""
    monkeypatch.setenv("LABFLEET_CACHE_DIR", str(tmp_path / "cache"))
    env = {**os.environ, "LABFLEET_CACHE_DIR": str(tmp_path / "cache")}
    made = {}
    for name, code in (("mlflow", MLFLOW_ALONE), ("first", OPEN_STORE), ("second", OPEN_STORE)):
        directory = tmp_path / name
        directory.mkdir()
        out = subprocess.run([sys.executable, "-c", code, "sqlite:///mlflow.db", "labfleet"], cwd=directory,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        made[name] = (directory, out.stderr)
    assert template.template_path().exists()
    assert "Creating initial MLflow database tables" not in made["second"][1]  # no migration ran
    reference = _schema(made["mlflow"][0] / "mlflow.db")
    for name in ("first", "second"):
        directory = made[name][0]
        assert _schema(directory / "mlflow.db") == reference
        assert _experiments(directory / "mlflow.db") == [(0, "Default", str(directory / "mlruns" / "0"))]
        assert (directory / "mlflow.db").stat().st_mode == (made["mlflow"][0] / "mlflow.db").stat().st_mode
    assert _experiments(made["mlflow"][0] / "mlflow.db") == [(0, "Default", str(made["mlflow"][0] / "mlruns" / "0"))]


def test_an_existing_store_is_never_replaced_and_an_empty_file_is_filled(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LABFLEET_CACHE_DIR", str(tmp_path / "cache"))
    other = tmp_path / "other.db"
    other.write_bytes(b"not a store, and not ours to replace")
    assert template.seed_store(f"sqlite:///{other}") is False
    assert other.read_bytes() == b"not a store, and not ours to replace"
    empty = tmp_path / "empty.db"
    empty.touch()
    assert template.seed_store(f"sqlite:///{empty}") is True
    assert _schema(empty) == _schema(template.template_path())
    assert template.seed_store("postgresql://127.0.0.1/test") is False
    assert not list(tmp_path.glob(".*.new"))  # no copy left behind


@pytest.mark.slow
def test_stores_made_at_once_by_many_processes_are_all_whole(tmp_path: Path, monkeypatch):
    """Six processes open the same new store at the same moment, with no template yet: each finds a
    whole store (one of them put it in place; `os.link` never replaces a file)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LABFLEET_CACHE_DIR", str(cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, "labfleet"], env=dict(os.environ),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert _experiments(tmp_path / "mlflow.db") == [(0, "Default", str(tmp_path / "mlruns" / "0"))]
    assert [p.name for p in cache.iterdir()] == [template.template_path().name]
    assert not list(tmp_path.glob(".*.new"))


def test_without_a_writable_cache_mlflow_makes_the_store(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    monkeypatch.setenv("LABFLEET_CACHE_DIR", str(cache / "labfleet"))
    try:
        if os.access(cache, os.W_OK):  # root writes anywhere: a file where the directory should be instead
            cache.chmod(0o700)
            (cache / "labfleet").write_text("")
        store = tmp_path / "mlflow.db"
        assert template.seed_store(f"sqlite:///{store}") is False
        assert not store.exists()
        from labfleet.tracking.runs import Tracker

        Tracker(f"sqlite:///{store}").check()
        assert _experiments(store)[0][:2] == (0, "Default")
    finally:
        cache.chmod(0o700)
