"""MLflow's store in a process of its own: the training commands' tracker talks to it through a pipe.

Importing MLflow and opening its SQLAlchemy store take seconds of one core (MLflow's package, its ORM models,
the first query's compilation), and every store call after that is milliseconds of ORM work. In the driver,
that is time before the first training step and CPU that a sweep's driver spends beside its own work. So
the training commands start this process first thing (`prestart`, before the spec is read), and it imports
MLflow on the other core while the driver imports torch and reads the spec. The driver never imports MLflow:
`StoreClient` stands in for `MlflowClient` (each call runs here, in order, and returns plain data with the
same attributes: `run.info.run_id`, `run.data.tags`, `metric.step`), and the tracker's writes reach the store
from this process.

- One process serves a whole driver process (any number of trackers and stores); it ends when the driver's
  end of the pipe closes, so a driver killed with SIGKILL leaves nothing behind.
- It ignores SIGINT and SIGTERM: a Ctrl-C or a SIGTERM to the process group reaches it too, and the driver
  then still writes its runs' end states through it.
- A store error comes back as the same exception (MLflow is imported in the driver only to re-raise it); a
  dead store process is `StoreProcessGone`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple


class Metric(NamedTuple):
    key: str
    value: float
    timestamp: int
    step: int


class Param(NamedTuple):
    key: str
    value: str


class RunTag(NamedTuple):
    key: str
    value: str


class StoreProcessGone(Exception):
    """The store process ended (it was killed): nothing more can be written through it."""


class StoreClient:
    """`MlflowClient`'s methods, run by the store process on the store at `uri`."""

    def __init__(self, process: StoreProcess, uri: str):
        self._process, self.uri = process, uri

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._process.request("call", self.uri, name, args, kwargs)

        call.__name__ = name
        return call

    def write_artifact(self, run_id: str, artifact_path: str, data: bytes, artifact_uri: str | None) -> None:
        """`write_artifact`, in the store process."""
        self._process.request("artifact", self.uri, run_id, artifact_path, data, artifact_uri)

    def release(self) -> None:
        """Close the store process's connections (SQLite's write-ahead log folded back into the file); the
        next call opens one again."""
        self._process.request("release")


class LocalClient:
    """`MlflowClient` in this process (the commands that read runs, and tests), taking the same arguments as
    `StoreClient`."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        from labfleet.tracking.template import seed_store
        from labfleet.tracking.uri import sqlite_wal

        sqlite_wal()
        seed_store(uri)
        self.uri = uri
        self.mlflow = MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mlflow, name)

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **kwargs: Any) -> Any:
        return self.mlflow.log_batch(run_id, _entities(metrics), _entities(params), _entities(tags), **kwargs)

    def write_artifact(self, run_id: str, artifact_path: str, data: bytes, artifact_uri: str | None) -> None:
        write_artifact(self.mlflow, self.uri, run_id, artifact_path, data, artifact_uri)

    def release(self) -> None:
        """Nothing: this process's connections close when it ends (`uri.close_engines`)."""


def write_artifact(client: Any, uri: str, run_id: str, artifact_path: str, data: bytes,
                   artifact_uri: str | None = None) -> None:
    """Bytes as the artifact `artifact_path` of a run (`client`: an `MlflowClient` of the store at `uri`)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.file_utils import local_file_uri_to_path

    directory, _, filename = artifact_path.rpartition("/")
    if artifact_uri is not None and artifact_uri.startswith("file://"):
        # A local artifact root: the file written in place (what MLflow's local repository does after
        # copying a temporary file), atomically, so that a reader never sees half a checkpoint.
        target = Path(local_file_uri_to_path(artifact_uri)) / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        partial.replace(target)
        return
    with tempfile.TemporaryDirectory(prefix="labfleet-artifact-") as tmp:
        local = Path(tmp) / filename
        local.write_bytes(data)
        if artifact_uri is None:  # a run opened elsewhere: MLflow reads its artifact location
            client.log_artifact(run_id, str(local), directory or None)
        else:
            get_artifact_repository(artifact_uri, tracking_uri=uri).log_artifact(str(local), directory or None)


def is_store_error(error: BaseException) -> bool:
    """Whether `error` is the store's (MLflow's, or its process gone), not a bug of the caller's."""
    if isinstance(error, StoreProcessGone):
        return True
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException)


class StoreProcess:
    """The driver's end: one request at a time (a lock), each answered before the next is sent."""

    def __init__(self) -> None:
        to_child, self._child_in = os.pipe()
        self._child_out, from_child = os.pipe()
        self.pid = os.getpid()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, this module
            [sys.executable, "-m", "labfleet.tracking.store_process", str(to_child), str(from_child)],
            pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL, env=env, start_new_session=False)
        os.close(to_child)
        os.close(from_child)
        self._send = Connection(self._child_in, readable=False)
        self._recv = Connection(self._child_out, writable=False)
        self._lock = threading.Lock()
        self._opened: set[str] = set()

    def client(self, uri: str) -> StoreClient:
        """A client of the store at `uri` (opened here on first use: a new SQLite store is made then)."""
        if uri not in self._opened:
            self.request("open", uri)
            self._opened.add(uri)
        return StoreClient(self, uri)

    def request(self, *message: Any) -> Any:
        with self._lock:
            try:
                self._send.send(message)
                ok, value = self._recv.recv()
            except (EOFError, OSError) as exc:
                raise StoreProcessGone(f"the MLflow store process ended (exit code {self.proc.poll()})") from exc
        if ok:
            return value
        raise _error(value)

    def stop(self, timeout: float = 30.0) -> None:
        """End the process once it has answered everything sent so far (its stores closed, SQLite's
        write-ahead logs folded back); at once where it never opened a store (a command refused its input
        while the process was still importing MLflow)."""
        with self._lock, contextlib.suppress(OSError):
            self._send.close()
            if not self._opened:
                self.proc.kill()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._recv.close()


_PROCESS: StoreProcess | None = None
_START = threading.Lock()


def store_process() -> StoreProcess:
    """This driver process's store process, started on first use (or by `prestart`)."""
    global _PROCESS
    with _START:
        if _PROCESS is None or _PROCESS.pid != os.getpid() or _PROCESS.proc.poll() is not None:
            _PROCESS = StoreProcess()
            atexit.register(_PROCESS.stop)
        return _PROCESS


def prestart() -> None:
    """Start the store process now, so that its imports overlap the driver's."""
    store_process()


def shutdown() -> None:
    """Stop the store process, if one runs (before the driver leaves with `os._exit`)."""
    global _PROCESS
    with _START:
        process, _PROCESS = _PROCESS, None
    if process is not None and process.pid == os.getpid():
        process.stop()


def _error(payload: tuple[bytes | None, str, str]) -> BaseException:
    pickled, kind, message = payload
    if pickled is not None:
        try:
            error = pickle.loads(pickled)  # noqa: S301 - our own child process's exception
            if isinstance(error, BaseException):
                return error
        except Exception:  # noqa: BLE001, S110 - an exception that does not survive the trip: its text
            pass
    return RuntimeError(f"{kind}: {message}")


# ---- the store process's side ----


def plain(value: Any) -> Any:
    """MLflow's entities (runs, metrics, experiments) as namespaces of plain data with the same attributes,
    so that the driver reads them without importing MLflow."""
    from mlflow.entities._mlflow_object import _MlflowObject

    if isinstance(value, _MlflowObject):
        return types.SimpleNamespace(**{key: plain(item) for key, item in value})
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def _entities(items: Any) -> list[Any]:
    """The driver's `Metric`, `Param` and `RunTag` tuples as MLflow's entities (MLflow's own pass through)."""
    from mlflow import entities

    kinds: dict[type, Any] = {Metric: entities.Metric, Param: entities.Param, RunTag: entities.RunTag}
    return [kinds[type(item)](*item) if type(item) in kinds else item for item in items]


class _Stores:
    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}

    def open(self, uri: str) -> None:
        self.clients[uri] = LocalClient(uri)

    def call(self, uri: str, name: str, args: tuple, kwargs: dict) -> Any:
        from labfleet.tracking.uri import retry_if_locked

        return plain(retry_if_locked(getattr(self.clients[uri], name), *args, **kwargs))

    def artifact(self, uri: str, run_id: str, artifact_path: str, data: bytes, artifact_uri: str | None) -> None:
        self.clients[uri].write_artifact(run_id, artifact_path, data, artifact_uri)

    def release(self) -> None:
        from labfleet.tracking.uri import close_engines

        close_engines()


def serve(receive: Connection, send: Connection) -> None:
    """Answer requests until the driver's end closes."""
    stores = _Stores()
    while True:
        try:
            kind, *args = receive.recv()
        except (EOFError, OSError):
            break
        try:
            reply = (True, getattr(stores, kind)(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the driver, which raises it
            try:
                pickled: bytes | None = pickle.dumps(exc)
            except Exception:  # noqa: BLE001
                pickled = None
            reply = (False, (pickled, type(exc).__name__, str(exc)))
        try:
            send.send(reply)
        except (BrokenPipeError, OSError):
            break
    from labfleet.tracking.uri import close_engines

    close_engines()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    receive = Connection(int(sys.argv[1]), writable=False)
    send = Connection(int(sys.argv[2]), readable=False)
    # the imports a store needs, while the driver is busy with its own
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    serve(receive, send)
    # The stores are closed: leave without the interpreter's teardown of MLflow and SQLAlchemy (a second
    # or so, which the driver would wait for)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # run as a module: serve with this module's own classes, not `__main__`'s
    from labfleet.tracking.store_process import main as serve_store

    serve_store()
