"""`labfleet ui`: the MLflow UI (and optuna-dashboard, when installed) on 127.0.0.1 over the stores the
runs used. Both are child processes; Ctrl-C (or SIGTERM) stops them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from rich.console import Console

from labfleet.errors import Problem, SpecError, shown
from labfleet.tracking.heartbeat import stale_note
from labfleet.tracking.uri import artifact_root_for, check_tracking_uri, redact_uri, resolve_tracking_uri, sqlite_path

HOST = "127.0.0.1"


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def mlflow_command(uri: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command and its environment. The store's URI goes in the environment
    (`MLFLOW_BACKEND_STORE_URI`, which `mlflow server` reads), not in argv, where `ps` would show its
    password to every user of the machine."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    root = artifact_root_for(uri)
    if root:  # the same artifact root the runs were written with
        command += ["--default-artifact-root", root]
    return command, env


def dashboard_command(storage: str, port: int) -> list[str] | None:
    if importlib.util.find_spec("optuna_dashboard") is None:
        return None
    executable = shutil.which("optuna-dashboard")
    base = [executable] if executable else [sys.executable, "-m", "optuna_dashboard"]
    return [*base, storage, "--host", HOST, "--port", str(port)]


def _checked_uri(tracking_uri: str | None) -> str:
    uri = resolve_tracking_uri(tracking_uri, None)
    problem = check_tracking_uri(uri)
    path = sqlite_path(uri)
    if problem is None and path is not None and not path.exists():
        problem = f"no MLflow store at {path} (run something first, or pass --tracking-uri)"
    if problem:
        raise SpecError([Problem("labfleet ui", "--tracking-uri", problem)])
    return uri


def _start_dashboard(storage: str, port: int, console: Console) -> list[subprocess.Popen[Any]]:
    """optuna-dashboard over the study storage, where it is installed and the storage holds no password
    (the dashboard takes its storage on its command line, where `ps` shows it to every user)."""
    command = dashboard_command(storage, port)
    shown_storage = redact_uri(storage)
    if command is None:
        console.print("optuna-dashboard is not installed (pip install optuna-dashboard) to browse "
                      f"the study storage {shown_storage}", highlight=False)
        return []
    if shown_storage != storage:
        console.print("optuna-dashboard takes its storage on its command line, where `ps` shows it: not "
                      f"started for {shown_storage}, which holds a password", highlight=False)
        return []
    process = subprocess.Popen(command)
    console.print(f"optuna-dashboard: http://{HOST}:{port}  (storage: {shown_storage})", highlight=False)
    return [process]


def runs_page(client: MlflowClient, experiment: str | None = None) -> tuple[str, str] | None:
    """(the path of the runs page, the experiment's name) of `experiment`, or of the experiment of the store's
    latest run; None when there is no such experiment (or no run). The runs page (`#/experiments/<id>/runs`),
    not the experiment's own page: MLflow 3 opens that on GenAI traces even for a model-training experiment."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        return None if found is None else (f"/#/experiments/{found.experiment_id}/runs", found.name)
    ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    latest = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not latest:
        return None
    found = client.get_experiment(latest[0].info.experiment_id)
    return f"/#/experiments/{found.experiment_id}/runs", found.name


def _page(client: MlflowClient, uri: str, experiment: str | None) -> tuple[str, str] | None:
    page = runs_page(client, experiment)
    if experiment is not None and page is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise SpecError([Problem("labfleet ui", "--experiment", f"no experiment {experiment!r} in "
                                 f"{redact_uri(uri)}; it has {', '.join(map(repr, names)) or 'none'}")])
    return page


def _show_page(console: Console, url: str, page: tuple[str, str] | None, browser: bool) -> None:
    if page is None:
        return
    console.print(f"Runs of {shown(page[1])}: {url}{page[0]}", highlight=False, soft_wrap=True)
    if browser and _has_display():
        import webbrowser

        webbrowser.open(url + page[0])


def _has_display() -> bool:
    """Whether a browser would open in a window (not a text browser in this terminal)."""
    return sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(tracking_uri: str | None, port: int, storage: str | None, dashboard_port: int, console: Console,
          experiment: str | None = None, browser: bool = True) -> int:
    uri = _checked_uri(tracking_uri)
    client = MlflowClient(uri)
    page = _page(client, uri, experiment)
    if storage is None and Path("optuna.db").exists():
        storage = "sqlite:///optuna.db"
    children: list[subprocess.Popen[Any]] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        command, env = mlflow_command(uri, port)
        mlflow_ui = subprocess.Popen(command, env=env)
        children.append(mlflow_ui)
        url = f"http://{HOST}:{port}"
        if not _wait_until_up(url + "/health", mlflow_ui):
            console.print(f"[red]the MLflow UI did not start on {url}[/red]")
            return 1
        console.print(f"MLflow UI: {url}  (store: {redact_uri(uri)})", highlight=False)
        _show_page(console, url, page, browser)
        note = stale_note(client)
        if note:
            console.print(f"[yellow]{shown(note)}[/yellow]", highlight=False)
        if storage:
            children.extend(_start_dashboard(storage, dashboard_port, console))
        console.print("Ctrl-C stops them.")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        # A Ctrl-C to the terminal's process group stops the servers too, and one may be seen dead before
        # this process handles its own SIGINT: give that a moment to arrive as KeyboardInterrupt.
        time.sleep(1.0)
        return 1  # a server died on its own
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
