"""The run hierarchy (ARCHITECTURE section 5) over `MlflowClient` with explicit run ids.

The driver is the only MLflow writer. `Tracker` keeps every run it opened until it is ended, so that
whatever happens (a trial failing, Ctrl-C, an exception in the driver) `close_open_runs` can give each
one an end state: no run is ever left RUNNING by a driver that is still alive.
"""

from __future__ import annotations

import json
import platform as _platform  # stdlib; the repository's `platform/` folder is a source root, not a package
import subprocess
import tempfile
import time
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import labfleet
from labfleet.tracking.uri import artifact_root_for, redact_uri

ROLE = "labfleet.role"
PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # log_batch limits
MAX_PARAM_LENGTH = 6000
SECRET_WORDS = ("password", "secret", "token", "credential", "api_key")


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
    value = json.dumps(data) if isinstance(data, list | tuple) else str(data)
    if prefix.rstrip(".") in ("tracking.uri", "sweep.storage"):
        value = redact_uri(value)
    flat[prefix[:-1]] = value[:MAX_PARAM_LENGTH]
    return flat


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


class Tracker:
    def __init__(self, uri: str):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._pending: dict[str, list[Metric]] = defaultdict(list)
        self.open_runs: dict[str, str] = {}  # run id -> role
        self._experiments: dict[str, str] = {}

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
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by another driver
                experiment = self.client.get_experiment_by_name(name)
                assert experiment is not None
                experiment_id = experiment.experiment_id
        else:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            experiment_id = experiment.experiment_id
        self._experiments[name] = experiment_id
        return experiment_id

    def start_run(self, experiment: str, role: str, name: str, parent: str | None = None,
                  tags: dict[str, str] | None = None, params: dict[str, str] | None = None) -> str:
        all_tags = {ROLE: role, RUN_NAME: name, "labfleet.version": labfleet.__version__, **(tags or {})}
        if parent:
            all_tags[PARENT] = parent
        run = self.client.create_run(self.experiment_id(experiment), tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self.open_runs[run_id] = role
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS):
            self.client.log_batch(run_id, tags=items[i:i + MAX_TAGS])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue metrics; they are written in batches by `flush` (at most 1000 per call)."""
        ts = timestamp_ms or int(time.time() * 1000)
        self._pending[run_id].extend(Metric(k, float(v), ts, int(step)) for k, v in values.items())
        if len(self._pending[run_id]) >= MAX_METRICS:
            self.flush(run_id)

    def flush(self, run_id: str | None = None) -> None:
        for rid in [run_id] if run_id else list(self._pending):
            pending = self._pending.pop(rid, [])
            for i in range(0, len(pending), MAX_METRICS):
                self.client.log_batch(rid, metrics=pending[i:i + MAX_METRICS])

    def log_bytes(self, run_id: str, artifact_path: str, data: bytes) -> None:
        """Store bytes (a checkpoint that travelled through Ray) as an artifact of the run."""
        directory, _, filename = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="labfleet-artifact-") as tmp:
            local = Path(tmp) / filename
            local.write_bytes(data)
            self.client.log_artifact(run_id, str(local), directory or None)

    def log_yaml(self, run_id: str, artifact_path: str, data: Any) -> None:
        self.log_bytes(run_id, artifact_path, yaml.safe_dump(data, sort_keys=False).encode())

    def end_run(self, run_id: str, status: str, error: str | None = None) -> None:
        """FINISHED, FAILED (with the error as the tag `labfleet.error`) or KILLED."""
        self.flush(run_id)
        if error:
            self.set_tags(run_id, {"labfleet.error": error[-5000:]})
        self.client.set_terminated(run_id, status=status)
        self.open_runs.pop(run_id, None)

    def close_open_runs(self, status: str, error: str | None = None) -> None:
        """Give every run this tracker opened and has not ended the same end state (children first)."""
        order = {"seed": 0, "trial": 1, "sweep": 2, "suite": 3}
        for run_id in sorted(self.open_runs, key=lambda r: order.get(self.open_runs[r], 9)):
            try:
                self.end_run(run_id, status, error)
            except MlflowException:
                continue  # the store went away; nothing more can be written to it
