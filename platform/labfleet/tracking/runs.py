"""The run hierarchy (ARCHITECTURE section 5) over `MlflowClient` with explicit run ids.

The driver is the only MLflow writer. `Tracker` keeps every run it opened until it is ended, so that
whatever happens (a trial failing, Ctrl-C, an exception in the driver) `close_open_runs` can give each
one an end state: no run is ever left RUNNING by a driver that is still alive.

With `background=True` (the training commands), the store is served by a process of its own
(tracking/store_process.py), and every write except `create_run` (whose id the driver needs at once) goes
through one writer thread, in order, which waits on that process while the driver goes on: the store's
work runs on another core. `drain()` waits for the queue (and re-raises a failed write);
`close()` drains and stops the thread. Writes are coalesced: metrics and tags wait in the tracker
until the driver's `commit()` (once per round of results), which writes each run's in one `log_batch`,
a seed run's params with its first metrics, and a run's end after its last batch, so that a short sweep
trial costs few store calls. A driver killed with SIGKILL loses what was queued, which is what
it loses anyway: its runs stay RUNNING until the next run of the command closes them, or `labfleet
reconcile` ends them (every open run carries the driver's identity and a heartbeat: tracking/heartbeat.py).
Every store call is retried while SQLite answers "database is locked" (`retry_if_locked`): two commands may share
a store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform as _platform  # stdlib; the repository's `platform/` folder is a source root, not a package
import queue
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from typing import Any

import yaml

import labfleet
import labfleet.tracking.tags as tag
from labfleet.tracking.heartbeat import Heartbeat, driver_identity, launcher_tags
from labfleet.tracking.store_process import LocalClient, Metric, Param, RunTag, is_store_error, store_process
from labfleet.tracking.uri import artifact_root_for, redact_credentials, redact_uri, retry_if_locked

MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000  # log_batch limits
MAX_PARAM_LENGTH = 6000
PBT_LINEAGE = "pbt_lineage.json"  # a PBT sweep run's record of every exploit and explore
SECRET_WORDS = ("password", "secret", "token", "credential", "api_key")
# MLflow 3 opens an experiment without this tag in GenAI mode ("Traces 0"); these are training runs.
EXPERIMENT_TAGS = {tag.EXPERIMENT_KIND: "custom_model_development"}


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings -> {"a.b.c": "value"}; lists are JSON; secrets are never params."""
    flat: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if any(word in str(key).lower() for word in SECRET_WORDS):
                continue
            flat.update(flatten(value, f"{prefix}{key}."))
        if not data and prefix:
            flat[prefix[:-1]] = "{}"
        return flat
    value = redact_credentials(json.dumps(data) if isinstance(data, list | tuple) else str(data))
    if prefix.rstrip(".") in ("tracking.uri", "sweep.storage"):
        value = redact_uri(value)
    flat[prefix[:-1]] = value[:MAX_PARAM_LENGTH]
    return flat


def redact_tree(data: Any) -> Any:
    """Nested data (a resolved spec) with the passwords of URLs in its strings replaced by ***."""
    if isinstance(data, dict):
        return {key: redact_tree(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [redact_tree(value) for value in data]
    return redact_credentials(data) if isinstance(data, str) else data


@cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": _platform.python_version()}
    for name in ("torch", "ray", "gymnasium", "mlflow", "optuna", "numpy", "pydantic"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


@cache
def git_commit(directory: str) -> tuple[str | None, bool]:
    """(commit, dirty) of the git work tree holding `directory`, or (None, False) outside one."""
    try:
        commit = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit, bool(status)
    except (OSError, subprocess.SubprocessError):
        return None, False


class TrackingUnavailable(Exception):
    """The tracking store cannot be opened (reported before any trial starts)."""


class TrackingWriteFailed(Exception):
    """A write to the store failed while training (a full disk, a server gone): the runs it left open
    were ended FAILED where the store still took that much."""


class _Writer(threading.Thread):
    """Runs queued store calls in order; the first failure is kept for `Tracker.drain` to raise."""

    def __init__(self) -> None:
        super().__init__(name="labfleet-mlflow-writer", daemon=True)
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.calls.get()
            try:
                if item is None:
                    return
                function, args = item
                if self.error is None:  # after a failure the store is suspect: stop writing
                    retry_if_locked(function, *args)
            except BaseException as exc:  # re-raised in the driver's thread by drain()
                self.error = exc
            finally:
                self.calls.task_done()


class Tracker:
    def __init__(self, uri: str, background: bool = False):
        self.uri = uri
        # A new SQLite store is a copy of a migrated one (tracking/template.py), made where the client opens it.
        # A training command's store is served by a process of its own (tracking/store_process.py).
        self.client: Any = store_process().client(uri) if background else LocalClient(uri)
        self._writer: _Writer | None = None
        if background:
            self._writer = _Writer()
            self._writer.start()
        self._pending: dict[str, list[Metric]] = defaultdict(list)
        self._pending_tags: dict[str, dict[str, str]] = defaultdict(dict)
        self._pending_params: dict[str, list[Param]] = {}
        self._ending: dict[str, str] = {}  # run id -> end status, written at the next `commit` (see end_run)
        self._artifact_uris: dict[str, str] = {}  # the open runs this tracker created: no get_run per artifact
        self.open_runs: dict[str, str] = {}  # run id -> role
        self.touched: set[str] = set()  # the runs this tracker created or reopened whose end is not written
        self._experiments: dict[str, str] = {}
        self.driver = driver_identity()
        self._heartbeat: Heartbeat | None = None
        if background:  # a training command: its open runs carry a heartbeat (see labfleet reconcile)
            self._heartbeat = Heartbeat(self.beat)
            self._heartbeat.start()

    def beat(self) -> None:
        """Renew the heartbeat of every open run (one tag write each, through the writer thread)."""
        now = str(int(time.time()))
        for run_id in list(self.open_runs):
            self._call(self.client.set_tag, run_id, tag.HEARTBEAT, now)

    def _call(self, function: Callable[..., Any], *args: Any) -> None:
        if self._writer is None:
            retry_if_locked(function, *args)
        else:
            self._writer.calls.put((function, args))

    def after_writes(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call `function` once every write queued so far (runs ended included) is in the store, in the
        writer thread, without waiting for it here (a sweep tells Optuna this way: MLflow first, and the
        driver goes on)."""
        self.commit()
        self._call(functools.partial(function, *args, **kwargs))

    def commit(self) -> None:
        """Queue what the driver's last round of results left: each run's queued metrics and tags in one
        `log_batch` (its params too, where they wait for its first metrics), and the end of every run
        `end_run` has ended since the last commit, after its last batch. The driver commits once a round,
        so that several results of one run cost one store call."""
        for run_id in list({*self._pending, *self._pending_tags}):
            self.flush(run_id)  # (a run in `_ending` is skipped here and written just below)
        while self._ending:
            run_id = next(iter(self._ending))
            status = self._ending.pop(run_id)
            self.flush(run_id)
            self._call(self.client.set_terminated, run_id, status)
            # (a long sweep's tracker keeps only the runs whose end is not written yet: after a failed write
            # the writer skips the rest, this included, so `_end_unended` still sees the run)
            self._call(self.touched.discard, run_id)
            self._artifact_uris.pop(run_id, None)

    def drain(self) -> None:
        """Wait until every queued write is done; raise the first one that failed."""
        self.commit()
        if self._writer is None:
            return
        self._writer.calls.join()
        if self._writer.error is not None:
            error, self._writer.error = self._writer.error, None
            message = (f"writing to the MLflow store {redact_uri(self.uri)} failed: {type(error).__name__}: "
                       f"{redact_credentials(str(error).strip().splitlines()[0] if str(error).strip() else '')}")
            self._end_unended(message)
            raise TrackingWriteFailed(message) from error

    def _end_unended(self, message: str) -> None:
        """After a failed write: end FAILED, with the error, every run this tracker touched that the store
        still holds RUNNING (whatever the store still takes; a run it refuses stays for `labfleet reconcile`)."""
        for run_id in sorted(self.touched, key=lambda r: 0 if self.open_runs.get(r) == "seed" else 1):
            try:
                if self.client.get_run(run_id).info.status != "RUNNING":
                    continue
                retry_if_locked(self.client.set_tag, run_id, tag.ERROR, message[:5000])
                retry_if_locked(self.client.set_terminated, run_id, "FAILED")
            except Exception:  # noqa: BLE001, S112 - the store refuses even this: reconcile ends it later
                continue
            self.open_runs.pop(run_id, None)
            self._ending.pop(run_id, None)

    def close(self) -> None:
        """Drain and stop the writer thread (the tracker writes synchronously afterwards)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._writer is None:
            return
        try:
            self.drain()
        finally:
            self._writer.calls.put(None)
            self._writer.join(timeout=60)
            self._writer = None
            with contextlib.suppress(Exception):  # a store gone: nothing of it is left to close
                self.client.release()

    def check(self) -> None:
        """Touch the store once, so that an unusable one fails before anything starts."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # any driver/HTTP/SQL error means the same thing to the user
            raise TrackingUnavailable(f"tracking store {redact_uri(self.uri)} is unusable: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None

    def experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            root = artifact_root_for(self.uri)
            location = f"{root}/{name}" if root else None
            try:
                experiment_id = retry_if_locked(self.client.create_experiment, name, artifact_location=location,
                                                tags=EXPERIMENT_TAGS)
            except Exception as exc:
                if not is_store_error(exc):
                    raise
                experiment = self.client.get_experiment_by_name(name)  # created meanwhile by another driver
                assert experiment is not None
                experiment_id = experiment.experiment_id
        else:
            if experiment.lifecycle_stage == "deleted":
                retry_if_locked(self.client.restore_experiment, experiment.experiment_id)
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # experiments made before labfleet set the kind
                if experiment.tags.get(key) != value:
                    retry_if_locked(self.client.set_experiment_tag, experiment_id, key, value)
        self._experiments[name] = experiment_id
        return experiment_id

    def start_run(self, experiment: str, role: str, name: str, parent: str | None = None,
                  tags: dict[str, str] | None = None, params: dict[str, str] | None = None,
                  params_with_first_flush: bool = False) -> str:
        """A new RUNNING run. Its params are written at once, or with `params_with_first_flush` in the same
        `log_batch` as its first metrics (a seed run's first results come within seconds: one store call
        fewer per seed)."""
        all_tags = {tag.ROLE: role, tag.RUN_NAME: name, tag.VERSION: labfleet.__version__, tag.DRIVER: self.driver,
                    tag.HEARTBEAT: str(int(time.time())), **launcher_tags(), **(tags or {})}
        if parent:
            all_tags[tag.PARENT] = parent
        run = retry_if_locked(self.client.create_run, self.experiment_id(experiment), tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self.open_runs[run_id] = role
        self.touched.add(run_id)
        self._artifact_uris[run_id] = run.info.artifact_uri
        if params and params_with_first_flush and self._writer is not None:
            self._pending_params[run_id] = [Param(k, v) for k, v in params.items()]
        elif params:
            self.log_params(run_id, params)
        return run_id

    def reopen_run(self, run_id: str, role: str) -> None:
        """An earlier invocation's run (a resumed suite or sweep) is RUNNING again, and ends with this one."""
        self._ending.pop(run_id, None)
        self._call(self.client.update_run, run_id, "RUNNING")
        self._call(self.client.log_batch, run_id, [], [], [RunTag(tag.DRIVER, self.driver),
                                                           RunTag(tag.HEARTBEAT, str(int(time.time()))),
                                                           *(RunTag(k, v) for k, v in launcher_tags().items())])
        self.open_runs[run_id] = role
        self.touched.add(run_id)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self._call(self.client.log_batch, run_id, [], items[i:i + MAX_PARAMS])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Write tags now (with anything queued for the run), or, for a run ended since the last commit,
        with its end."""
        self.queue_tags(run_id, tags)
        self.flush(run_id)

    def queue_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Tags written with the run's next `flush` (one store call for metrics and tags together)."""
        self._pending_tags[run_id].update({k: str(v)[:5000] for k, v in tags.items()})

    def log_metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue metrics; they are written in batches by `flush` (at most 1000 per call)."""
        ts = timestamp_ms or int(time.time() * 1000)
        self._pending[run_id].extend(Metric(k, float(v), ts, int(step)) for k, v in values.items())
        if len(self._pending[run_id]) >= MAX_METRICS:
            self.flush(run_id)

    def flush(self, run_id: str | None = None) -> None:
        """Write the queued metrics, params and tags in as few `log_batch` calls as MLflow's limits allow
        (1000 metrics, 100 params, 100 tags, 1000 in all). A run ended since the last commit is written
        with its end (`commit`)."""
        for rid in [run_id] if run_id else list({*self._pending, *self._pending_tags, *self._pending_params}):
            if rid in self._ending:  # written with its end
                continue
            metrics = self._pending.pop(rid, [])
            params = self._pending_params.pop(rid, [])
            tags = [RunTag(k, v) for k, v in self._pending_tags.pop(rid, {}).items()]
            while metrics or params or tags:
                batch_params, params = params[:MAX_PARAMS], params[MAX_PARAMS:]
                batch_tags, tags = tags[:MAX_TAGS], tags[MAX_TAGS:]
                room = min(MAX_METRICS, MAX_ENTITIES - len(batch_params) - len(batch_tags))
                batch_metrics, metrics = metrics[:room], metrics[room:]
                self._call(self.client.log_batch, rid, batch_metrics, batch_params, batch_tags)

    def log_bytes(self, run_id: str, artifact_path: str, data: bytes) -> None:
        """Store bytes (a checkpoint that travelled through Ray) as an artifact of the run."""
        self._call(self.client.write_artifact, run_id, artifact_path, data, self._artifact_uris.get(run_id))

    def log_yaml(self, run_id: str, artifact_path: str, data: Any) -> None:
        # libyaml's emitter where PyYAML has it: same text, about 6x faster than the pure-Python one
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        self.log_bytes(run_id, artifact_path, yaml.dump(data, Dumper=dumper, sort_keys=False).encode())

    def end_run(self, run_id: str, status: str, error: str | None = None) -> None:
        """FINISHED, FAILED (with the error as the tag `labfleet.error`) or KILLED. With the writer thread,
        the end is written at the next `commit` (the driver commits once per round of results, and before
        anything that must come after it: `after_writes`, `drain`), so that what the rest of the round adds
        to the run (a sweep's `optuna.state`, a later end status) goes in the same store calls."""
        if error:
            self.queue_tags(run_id, {tag.ERROR: error[-5000:]})
        self.open_runs.pop(run_id, None)
        self._ending.pop(run_id, None)  # a second end in the round: the last one counts, written once
        self._ending[run_id] = status
        if self._writer is None:
            self.commit()

    def close_open_runs(self, status: str, error: str | None = None) -> None:
        """Give every run this tracker opened and has not ended the same end state (children first)."""
        order = {"seed": 0, "trial": 1, "sweep": 2, "suite": 3}
        for run_id in sorted(self.open_runs, key=lambda r: order.get(self.open_runs[r], 9)):
            try:
                self.end_run(run_id, status, error)
            except Exception as exc:
                if not is_store_error(exc):
                    raise
                continue  # the store went away; nothing more can be written to it
        with contextlib.suppress(Exception):  # the store went away; the next run of the command closes them
            self.drain()
