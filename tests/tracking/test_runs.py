"""The tracker's writer thread and its SQLite lock retries, against real SQLite stores read back with
MlflowClient (and sqlite3)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from labfleet.tracking.runs import Tracker
from labfleet.tracking.uri import retry_if_locked


def test_queued_writes_reach_the_store_in_order(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", background=True)
    run_id = tracker.start_run("exp", "seed", "r", params={f"p{i}": str(i) for i in range(150)})
    for step in range(3):
        tracker.log_metrics(run_id, {"eval/return_mean": float(step)}, step)
    tracker.queue_tags(run_id, {"labfleet.node": "n1"})
    tracker.log_yaml(run_id, "spec.yaml", {"name": "r", "seeds": [0]})
    tracker.log_bytes(run_id, "checkpoints/final.pt", b"\x00\x01bytes")
    tracker.end_run(run_id, "FINISHED")
    tracker.close()

    client = MlflowClient(tracker.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(run.data.params) == 150 and run.data.params["p149"] == "149"  # two log_batch calls
    assert run.data.tags["labfleet.node"] == "n1"
    history = client.get_metric_history(run_id, "eval/return_mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    spec = Path(client.download_artifacts(run_id, "spec.yaml", str(tmp_path))).read_text()
    assert spec == "name: r\nseeds:\n- 0\n"
    checkpoint = Path(client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp_path))).read_bytes()
    assert checkpoint == b"\x00\x01bytes"


def test_local_artifacts_are_written_in_place_and_replaced_whole(tmp_path: Path):
    """A local artifact root takes the bytes as a file of its own (no temporary copy through MLflow's
    repository); a checkpoint written again replaces the last one whole, and no partial file is left."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", background=True)
    run_id = tracker.start_run("exp", "seed", "r")
    for data in (b"first checkpoint", b"second"):
        tracker.log_bytes(run_id, "checkpoints/latest.pt", data)
    tracker.end_run(run_id, "FINISHED")
    tracker.close()
    client = MlflowClient(tracker.uri)
    uri = client.get_run(run_id).info.artifact_uri
    assert uri.startswith("file://")
    directory = Path(uri.removeprefix("file://")) / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["latest.pt"]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/latest.pt"]
    assert Path(client.download_artifacts(run_id, "checkpoints/latest.pt", str(tmp_path))).read_bytes() == b"second"


def test_a_round_of_writes_is_one_log_batch_per_run_and_its_end_comes_after_its_last_tags(tmp_path: Path):
    """Coalescing: a seed run's params wait for its first metrics; what a round adds to a run (metrics,
    tags, even tags set after `end_run`, such as a sweep's `optuna.state`) goes in one `log_batch` at the
    commit, the end status after it, and `after_writes` after both (a sweep's tell)."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", background=True)
    calls: list[tuple[str, str]] = []
    client = tracker.client

    def counted(name: str):  # type: ignore[no-untyped-def]
        method = getattr(client, name)

        def call(run_id: str, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append((name, run_id))  # counted, then written to the real store
            return method(run_id, *args, **kwargs)
        return call

    for name in ("log_batch", "set_terminated"):
        setattr(client, name, counted(name))
    seed = tracker.start_run("exp", "seed", "s", params={"a": "1", "b": "2"}, params_with_first_flush=True)
    trial = tracker.start_run("exp", "trial", "t", params={"seeds": "[0]"})
    tracker.drain()
    assert calls == [("log_batch", trial)]  # the seed's params wait for its first metrics
    calls.clear()
    tracker.log_metrics(seed, {"eval/return_mean": 1.0}, 5)
    tracker.queue_tags(seed, {"labfleet.node": "n1"})
    tracker.log_metrics(trial, {"intermediate/eval/return_mean": 1.0}, 5)
    tracker.end_run(seed, "FINISHED")
    tracker.log_metrics(trial, {"eval/return_mean": 1.0}, 5)
    tracker.end_run(trial, "FINISHED")
    for run_id in (trial, seed):
        tracker.set_tags(run_id, {"optuna.state": "COMPLETE"})
    seen: list[tuple[str, str]] = []
    tracker.after_writes(lambda: seen.extend((client.get_run(r).info.status, client.get_run(r).data.tags.get(
        "optuna.state", "")) for r in (seed, trial)))
    tracker.close()
    assert sorted(calls) == sorted([("log_batch", seed), ("set_terminated", seed), ("log_batch", trial),
                                    ("set_terminated", trial)])
    assert calls.index(("log_batch", seed)) < calls.index(("set_terminated", seed))
    assert seen == [("FINISHED", "COMPLETE")] * 2  # the tell's place: after every write of the round
    run = MlflowClient(tracker.uri).get_run(seed)
    assert run.data.params == {"a": "1", "b": "2"} and run.data.tags["labfleet.node"] == "n1"
    assert run.data.metrics == {"eval/return_mean": 1.0}
    assert MlflowClient(tracker.uri).get_run(trial).data.metrics == {"intermediate/eval/return_mean": 1.0,
                                                                     "eval/return_mean": 1.0}


def test_a_failed_write_is_raised_at_the_next_drain_and_a_reopened_run_ends_again(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", background=True)
    run_id = tracker.start_run("exp", "suite", "r")
    tracker.end_run(run_id, "KILLED")
    tracker.log_metrics("0" * 32, {"x": 1.0}, 0)  # no such run
    tracker.flush()
    with pytest.raises(Exception, match="0{32}"):
        tracker.drain()
    tracker.reopen_run(run_id, "suite")  # the writer writes again once the error was collected
    tracker.drain()
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "RUNNING"
    tracker.close_open_runs("FINISHED")
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FINISHED"


def _store(tmp_path: Path) -> Path:
    db = tmp_path / "store.db"
    with sqlite3.connect(db) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x INTEGER)")
    return db


def _read_then_write(db: Path, meanwhile) -> None:  # type: ignore[no-untyped-def]
    """A deferred transaction that reads, lets another connection commit, then writes (as MLflow's
    create_run reads the experiment before it inserts the run)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM t").fetchall()
        meanwhile()
        conn.execute("INSERT INTO t VALUES (2)")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def test_sqlite_refuses_a_stale_transaction_at_once_and_the_retry_runs_it_again(tmp_path: Path):
    db = _store(tmp_path)
    other = sqlite3.connect(db, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):  # no waiting: busy_timeout is 5 s
        _read_then_write(db, lambda: other.execute("INSERT INTO t VALUES (1)"))

    attempts: list[int] = []

    def once() -> None:
        if not attempts:
            other.execute("INSERT INTO t VALUES (1)")
        attempts.append(1)

    retry_if_locked(_read_then_write, db, once)
    assert len(attempts) == 2
    assert sorted(x for (x,) in other.execute("SELECT x FROM t")) == [1, 1, 2]
    other.close()


def test_a_store_made_without_wal_opens_while_another_connection_writes_and_switches_later(tmp_path: Path):
    """The first driver on a store that an older tool made (rollback journal): opening a connection while
    this process's writer thread holds the write lock must not fail with "database is locked" (it did:
    switching to WAL needs the file alone); a later connection makes the switch."""
    from sqlalchemy import create_engine, text

    from labfleet.tracking.uri import sqlite_wal

    sqlite_wal()
    db = tmp_path / "old.db"
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x INTEGER)")
    assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")  # the write lock, held
    threading.Timer(0.3, writer.execute, ("COMMIT",)).start()  # the other write ends while this one waits
    with create_engine(f"sqlite:///{db}").connect() as connection:  # waits for the switch, and makes it
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("SELECT count(*) FROM t")).scalar() == 1
    writer.close()
