"""`labfleet submit | status | logs | stop`: suites and specs as Ray Jobs on a cluster.

`submit` checks the file locally first (bad input: exit 2, nothing submitted), then submits a Ray Job whose
entrypoint is `PYTHON -m labfleet run|sweep|suite FILE ...` on the head node. The job's working directory
is the directory of the file (so the specs a suite references travel with it; they must lie under it), and
with `--ship-package` the labfleet package travels too (for a cluster whose image lacks it or has another
version). The driver then runs on the cluster: it joins the cluster through $RAY_ADDRESS, writes to the
tracking URI it is given (a tracking server, `http://...`, on a cluster), and moves checkpoints from the
workers through Ray, so nodes share no filesystem. `labfleet stop` sends the driver SIGTERM, which it
handles like Ctrl-C (every open run ends KILLED); Ray's grace period is raised to 60 s for that cleanup.

Ray 2.60 enables token authentication: the client reads the token as every Ray process does
(`RAY_AUTH_MODE=token`, the token from $RAY_AUTH_TOKEN or ~/.ray/auth_token).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from labfleet.errors import Problem, SpecError
from labfleet.tracking import tags as tag
from labfleet.tracking.uri import redact_credentials, redact_uri

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STOP_GRACE_SECONDS = 60
EXIT_BY_STATUS = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def jobs_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_JOBS_ADDRESS") \
        or DEFAULT_ADDRESS


def client(address: str | None) -> Any:
    """A Jobs API client (the CLI sets RAY_AUTH_MODE=token before Ray is imported)."""
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # noqa: BLE001 - connection, version or authentication: the user's address/token
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError([Problem("labfleet", "--address", f"cannot use the Ray Jobs API at {url}: {first} (a Ray "
                                 "2.60 cluster needs its token: ~/.ray/auth_token or $RAY_AUTH_TOKEN)")]) from None


def _kind(data: dict[str, Any], sweep: bool) -> str:
    if "experiments" in data:
        return "suite"
    return "sweep" if sweep else "run"


# What a submission never ships from its directory: stores and their artifacts, logs, version control, and
# the files that hold secrets by convention (dotenv files, keys, cloud and SSH credentials).
EXCLUDES = ["*.db", "*.db-wal", "*.db-shm", "mlartifacts/", "mlruns/", "*.log", ".git/", "__pycache__/",
            ".env", ".env.*", "*.env", ".envrc", ".netrc", ".pgpass", "*.pem", "*.key", "id_rsa*", "id_ed25519*",
            "id_ecdsa*", ".ssh/", ".aws/", ".gnupg/", ".docker/", ".kube/", ".config/gcloud/"]
MAX_SHIPPED_ENTRIES = 100_000  # how many paths `shipping_excludes` looks at before it stops looking


def has_credentials(text: str) -> bool:
    """Whether `text` holds a URL with a password (`scheme://user:password@host`) or one in its query."""
    return redact_credentials(text) != text or redact_uri(text) != text


def shipping_excludes(workdir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Ray's `excludes` for a submitted directory: `EXCLUDES`, and every symbolic link in it that leads
    outside it (Ray's packaging follows links, so a link to ~/.ssh would ship the keys). Returns them and
    the (link, target) pairs left out."""
    root = workdir.resolve()
    outside: list[tuple[str, str]] = []
    seen = 0
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            seen += 1
            path = Path(directory) / name
            if path.is_symlink():
                target = path.resolve()
                if root != target and root not in target.parents:
                    outside.append(("/" + str(path.relative_to(root)), str(target)))
        dirs[:] = [d for d in dirs if not (Path(directory) / d).is_symlink() and d not in (".git", "__pycache__")]
        if seen > MAX_SHIPPED_ENTRIES:
            break
    return EXCLUDES + [link for link, _ in outside], outside


def _refuse_credentials(tracking_uri: str | None, overrides: list[str]) -> None:
    """A password in the command line would be in the job's entrypoint, which anyone who can list jobs sees."""
    secret = "holds a password, which the job's entrypoint would show to anyone who can list jobs: set " \
             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or the database's own variables, such as " \
             "PGPASSWORD) in the cluster's environment instead"
    if tracking_uri and has_credentials(tracking_uri):
        raise SpecError([Problem("labfleet submit", "--tracking-uri", secret)])
    for item in overrides:
        if has_credentials(item):
            raise SpecError([Problem("labfleet submit", f"--set {item.partition('=')[0]}", secret)])


def plan_submission(path: Path, overrides: list[str], tracking_uri: str | None, sweep: bool, python: str,
                    n_trials: int | None = None) -> tuple[str, str, Path]:
    """(command kind, entrypoint, working directory), after every local check of the file."""
    from labfleet.spec.loading import load_suite, parse_set_options, read_yaml, resolve_document

    _refuse_credentials(tracking_uri, overrides)
    doc = read_yaml(path)
    kind = _kind(doc.data, sweep)
    parsed = parse_set_options(overrides)
    workdir = path.resolve().parent
    if kind == "suite":
        _, planned = load_suite(path, parsed)
        for entry in planned:
            spec_path = Path(entry.spec_path).resolve()
            if workdir not in spec_path.parents:
                raise SpecError([Problem(str(path), "experiments", f"{spec_path} is outside {workdir}: a submitted "
                                         "suite ships its own directory, so its specs must lie under it")])
    else:
        _, resolved = resolve_document(doc, parsed)
        if kind == "sweep" and resolved.sweep is None:
            raise SpecError([Problem(str(path), "sweep", "--sweep needs a `sweep:` section")])
    args = [python, "-m", "labfleet", kind, path.name, "--quiet"]
    for item in overrides:
        args += ["--set", item]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if n_trials and kind == "sweep":
        args += ["--n-trials", str(n_trials)]
    return kind, " ".join(shlex.quote(a) for a in args), workdir


def submit(path: Path, *, address: str | None, overrides: list[str], tracking_uri: str | None, sweep: bool,
           python: str, ship_package: bool, wait: bool, console: Console, n_trials: int | None = None) -> int:
    kind, entrypoint, workdir = plan_submission(path, overrides, tracking_uri, sweep, python, n_trials)
    jobs = client(address)
    excludes, outside = shipping_excludes(workdir)
    for link, target in outside:
        console.print(f"not shipped: {link} (a link to {target}, outside {workdir})", highlight=False)
    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "excludes": excludes,
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_SECONDS), "PYTHONUNBUFFERED": "1"},
    }
    if ship_package:
        import labfleet

        runtime_env["py_modules"] = [str(Path(labfleet.__file__).parent)]
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)[:40]
    submission_id = f"labfleet-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000}"
    deadline = time.monotonic() + 120
    while True:
        try:
            job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                     metadata={tag.JOB_KIND: kind, tag.JOB_FILE: path.name})
            break
        except RuntimeError as exc:  # a head that has just started may not have its job agent yet
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SpecError([Problem(str(path), "--address", f"the Ray Jobs API at {jobs_address(address)} "
                                         f"refused the job: {first}")]) from None
            time.sleep(2)
    console.print(f"Submitted {kind} {path.name} as job {job_id} to {jobs_address(address)}", highlight=False)
    console.print(f"  entrypoint: {entrypoint}", highlight=False)
    console.print(f"  follow: labfleet logs {job_id} --follow   status: labfleet status {job_id}   "
                  f"cancel: labfleet stop {job_id}", highlight=False)
    if not wait:
        return 0
    return follow(jobs, job_id, console)


def _state(jobs: Any, job_id: str) -> str:
    value = jobs.get_job_status(job_id)
    return str(getattr(value, "value", value))


def follow(jobs: Any, job_id: str, console: Console, poll: float = 1.0) -> int:
    """Print the job's logs as they grow until it ends; the exit code its status maps to."""
    shown = 0
    while True:
        status = _state(jobs, job_id)
        logs = jobs.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in EXIT_BY_STATUS:
            info = jobs.get_job_info(job_id)
            console.print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""),
                          highlight=False)
            return EXIT_BY_STATUS[status]
        time.sleep(poll)


def status(job_id: str, address: str | None, console: Console) -> int:
    jobs = client(address)
    try:
        info = jobs.get_job_info(job_id)
    except RuntimeError as exc:
        raise SpecError([Problem("labfleet status", "JOB", f"{job_id}: {exc}")]) from None
    state = str(getattr(info.status, "value", info.status))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
    console.print(f"{job_id}: {state}  started {started}  entrypoint: {info.entrypoint}", highlight=False)
    if info.message:
        console.print(f"  {info.message}", highlight=False)
    return 0


def logs(job_id: str, address: str | None, follow_logs: bool, console: Console) -> int:
    jobs = client(address)
    try:
        if follow_logs:
            return follow(jobs, job_id, console)
        sys.stdout.write(jobs.get_job_logs(job_id))
    except RuntimeError as exc:
        raise SpecError([Problem("labfleet logs", "JOB", f"{job_id}: {exc}")]) from None
    return 0


def stop(job_id: str, address: str | None, console: Console, wait_seconds: float = STOP_GRACE_SECONDS + 30) -> int:
    jobs = client(address)
    try:
        stopped = jobs.stop_job(job_id)
    except RuntimeError as exc:
        raise SpecError([Problem("labfleet stop", "JOB", f"{job_id}: {exc}")]) from None
    if not stopped:
        console.print(f"job {job_id} had already ended", highlight=False)
        return 0
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        state = _state(jobs, job_id)
        if state in EXIT_BY_STATUS:
            console.print(f"job {job_id}: {state}", highlight=False)
            return 0
        time.sleep(1)
    console.print(f"job {job_id} is still stopping", highlight=False)
    return 1
