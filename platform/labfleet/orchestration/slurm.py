"""`labfleet submit --slurm | status | logs | stop slurm:<jobid>`: suites, specs and sweeps as SLURM batch jobs.

`submit --slurm` checks the file locally (bad input: exit 2, nothing submitted), writes a batch script beside it
(`.labfleet/slurm/` in the file's directory; `--dry-run` prints it instead) and hands it to `sbatch`, which finds
its cluster as it always does (`$SLURM_CONF` or SLURM's default configuration). The job:
- starts one Ray node a node with `srun` (`labfleet.orchestration.slurm_node`: the head on the first node, ports
  from the job id, a fresh token in its environment), waits for every node, and runs the driver on the first
  node against that cluster only;
- is requeueable: on preemption or `scontrol requeue` every process gets SIGTERM; the driver ends its open runs
  KILLED as on Ctrl-C, and the requeued job runs the same command, which reopens those runs and continues every
  seed from its checkpoint (a sweep continues its study). The job's output file is appended to, start after start;
- stops exactly the Ray processes it started, whatever ends it.

Every node must reach the tracking store, so a SQLite or file store on a node-local filesystem is refused; a
tracking server (`http://...`) or a database server is what a cluster needs. The submitter's environment goes
with the job (`sbatch` exports it), which is how credentials (`MLFLOW_TRACKING_PASSWORD`, `PGPASSWORD`) reach
the driver: never through the script, its arguments or the job's comment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console

from labfleet.errors import Problem, SpecError
from labfleet.tracking import tags as tag

PREFIX = "slurm:"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
EXIT_BY_STATE = {"COMPLETED": 0, "CANCELLED": 130, "PREEMPTED": 130}
# Filesystems every node of a cluster sees the same; a store anywhere else is one node's alone.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "cifs", "smb3", "smbfs",
                      "glusterfs", "fuse.glusterfs", "fuse.cephfs", "fuse.sshfs", "panfs", "wekafs", "orangefs",
                      "fuse.beegfs", "fuse.juicefs", "9p", "virtiofs")


@dataclass
class SlurmOptions:
    nodes: int = 1
    partition: str | None = None
    time: str | None = None
    gpus_per_node: int | None = None
    cpus_per_node: int | None = None  # None: whole nodes (--exclusive)
    account: str | None = None
    qos: str | None = None
    sbatch_args: list[str] = field(default_factory=list)


def job_id(text: str) -> str:
    """`slurm:123` -> `123` (a bare number is taken too)."""
    raw = text[len(PREFIX):] if text.startswith(PREFIX) else text
    if not re.fullmatch(r"\d+(_\d+)?", raw):
        raise SpecError([Problem("labfleet", "JOB", f"{text!r} is not a SLURM job: expected slurm:<jobid>")])
    return raw


def is_slurm_job(text: str) -> bool:
    return text.startswith(PREFIX)


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) that holds `path`, from /proc/mounts; ("/", "?") where unknown."""
    best, kind = "/", "?"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best, kind
    target = str(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return best, kind


def store_path(uri: str, workdir: Path) -> Path | None:
    """The local file or directory a tracking URI stores in (SQLite, file:, a bare path), else None."""
    if uri.startswith("sqlite:///"):
        raw = uri[len("sqlite:///"):].split("?", 1)[0]
        return (workdir / raw) if not raw.startswith("/") else Path(raw)
    if uri.startswith("file:"):
        return Path(urlsplit(uri).path)
    if "://" not in uri:
        return (workdir / uri).resolve()
    return None


def store_problem(uri: str, workdir: Path) -> str | None:
    """Why the nodes of a SLURM job could not share the store `uri` (tracking or Optuna), or None."""
    path = store_path(uri, workdir)
    if path is None:
        return None
    point, kind = _mount_of(path.resolve() if path.exists() else path.parent.resolve())
    if kind in SHARED_FILESYSTEMS:
        return None
    return (f"{uri} is {path}, on {point} ({kind}), which only one node sees, and a requeued job may start on "
            "another: use a server (a tracking server, --tracking-uri http://HOST:PORT, which "
            "deploy/local/mlflow-server.sh starts; a database for a sweep's storage) or a shared filesystem")


def _stores(path: Path, overrides: list[str], kind: str, tracking_uri: str | None) -> list[tuple[str, str]]:
    """(where it is named, URI) of every store the job writes: the tracking store first, then each sweep's
    Optuna storage."""
    from labfleet.spec.loading import load_spec, load_suite, parse_set_options
    from labfleet.tracking.studies import DEFAULT_STORAGE
    from labfleet.tracking.uri import resolve_tracking_uri

    parsed = parse_set_options(overrides)
    if kind == "suite":
        suite, entries = load_suite(path, parsed)
        specs = [(e.spec, bool(e.entry.sweep)) for e in entries]
        spec_uri = suite.tracking.uri
    else:
        spec = load_spec(path, parsed)
        specs, spec_uri = [(spec, kind == "sweep")], spec.tracking.uri
    stores = [("--tracking-uri" if tracking_uri else "tracking.uri", resolve_tracking_uri(tracking_uri, spec_uri))]
    if not tracking_uri and kind == "suite":
        stores += [("tracking.uri", spec.tracking.uri) for spec, _ in specs if spec.tracking.uri]
    for spec, is_sweep in specs:
        if is_sweep and spec.sweep is not None:
            stores.append(("sweep.storage", spec.sweep.storage or DEFAULT_STORAGE))
    return stores


def batch_script(*, name: str, kind: str, file: str, command: str, workdir: Path, python: str, tracking_uri: str,
                 options: SlurmOptions) -> str:
    """The sbatch script of one submission."""
    out_dir = workdir / ".labfleet" / "slurm"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={options.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    lines.append(f"#SBATCH --cpus-per-task={options.cpus_per_node}" if options.cpus_per_node else "#SBATCH --exclusive")
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={out_dir}/slurm-%j.out",
              f"#SBATCH --chdir={workdir}", f"#SBATCH --comment=labfleet:{tracking_uri}"]
    for flag, value in (("partition", options.partition), ("time", options.time),
                        ("gpus-per-node", options.gpus_per_node), ("account", options.account),
                        ("qos", options.qos)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {arg}" for arg in options.sbatch_args]
    py, node = shlex.quote(python), f"{shlex.quote(python)} -m labfleet.orchestration.slurm_node"
    n = options.nodes
    lines += [
        f"# labfleet {kind} {file}. Run again after a requeue (preemption, `scontrol requeue`), the same command",
        "# reopens the same MLflow runs and continues every seed from its checkpoint.",
        "set -u",
        'echo "labfleet: job $SLURM_JOB_ID start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $SLURM_JOB_NODELIST '
        'at $(date -Iseconds)"',
        "unset RAY_ADDRESS",
        "export RAY_AUTH_MODE=token PYTHONUNBUFFERED=1",
        f"RAY_AUTH_TOKEN=\"$({py} -c 'import secrets; print(secrets.token_hex(32))')\"",
        "export RAY_AUTH_TOKEN  # this job's cluster only: every node reads it from the environment",
        f'address="$({node} address)" || {{ echo "labfleet: {py} cannot run labfleet on this node: install it for '
        'that interpreter, or name another with --python"; exit 1; }',
        f"srun --overlap --job-name=labfleet-ray --nodes={n} --ntasks={n} --ntasks-per-node=1 --kill-on-bad-exit=1 "
        f"{node} node &",
        "nodes=$!",
        "# SIGUSR1, which srun passes on to every node's task: each stops its own Ray at once",
        'stop_nodes() { kill -USR1 "$nodes" 2>/dev/null; wait "$nodes" 2>/dev/null; }',
        f'if ! {node} wait --nodes {n} --watch "$nodes"; then stop_nodes; exit 1; fi',
        f'{command} --address "$address" &',
        "driver=$!",
        "# SIGTERM (preemption, requeue, scancel) reaches the driver, which ends its runs as on Ctrl-C; the",
        "# script waits for it before the Ray nodes stop.",
        "trap 'kill -TERM \"$driver\" 2>/dev/null' TERM INT",
        'while :; do wait "$driver"; code=$?; kill -0 "$driver" 2>/dev/null || break; done',
        'echo "labfleet: driver exited with code $code at $(date -Iseconds)"',
        "stop_nodes",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def _sbatch_error(text: str) -> str:
    lines = [line.removeprefix("sbatch: error: ").strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) or "sbatch failed without a message"


def submit(path: Path, *, overrides: list[str], tracking_uri: str | None, sweep: bool, python: str | None,
           options: SlurmOptions, dry_run: bool, wait: bool, console: Console, n_trials: int | None = None) -> int:
    from labfleet.orchestration.jobs import plan_submission

    interpreter = python or sys.executable
    kind, command, workdir = plan_submission(path, overrides, tracking_uri, sweep, interpreter, n_trials)
    stores = _stores(path, overrides, kind, tracking_uri)
    problems = [Problem(str(path), where, problem) for where, uri in stores
                if (problem := store_problem(uri, workdir))]
    if problems:
        raise SpecError(problems)
    uri = stores[0][1]
    if not tracking_uri:
        command += " --tracking-uri " + shlex.quote(uri)  # the store checked here, whatever the nodes' environment
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)[:40]
    script = batch_script(name=f"labfleet-{stem}", kind=kind, file=path.name, command=command, workdir=workdir,
                          python=interpreter, tracking_uri=uri, options=options)
    if dry_run:
        sys.stdout.write(script)
        return 0
    out_dir = workdir / ".labfleet" / "slurm"
    out_dir.mkdir(parents=True, exist_ok=True)
    script_path = out_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000}.sbatch"
    script_path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SpecError([Problem(str(path), "--slurm", f"sbatch refused the job: {_sbatch_error(done.stderr)}")])
    jid = done.stdout.strip().split(";")[0]
    console.print(f"Submitted {kind} {path.name} as job {PREFIX}{jid} ({options.nodes} node(s))", highlight=False)
    console.print(f"  script: {script_path}", highlight=False)
    console.print(f"  follow: labfleet logs {PREFIX}{jid} --follow   status: labfleet status {PREFIX}{jid}   "
                  f"cancel: labfleet stop {PREFIX}{jid}", highlight=False)
    return follow(jid, console) if wait else 0


# --- the job afterwards ---------------------------------------------------------------------------------------
def job_fields(jid: str) -> dict[str, str] | None:
    """The job as `scontrol show job` knows it (None once SLURM has forgotten it: after MinJobAge)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    text = done.stdout.strip().splitlines()[0]
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", text))
    fields = {}
    for here, after in zip(keys, [*keys[1:], None], strict=True):
        fields[here.group(1)] = text[here.end(): after.start() if after else len(text)].strip()
    return fields


def _known(jid: str, what: str) -> dict[str, str]:
    fields = job_fields(jid)
    if fields is None:
        raise SpecError([Problem(f"labfleet {what}", "JOB", f"{PREFIX}{jid}: SLURM does not know this job (never "
                                 "submitted, or ended longer ago than the cluster's MinJobAge)")])
    return fields


def _state(fields: dict[str, str]) -> str:
    return fields.get("JobState", "UNKNOWN").split()[0]


def tracking_of(fields: dict[str, str]) -> str | None:
    comment = fields.get("Comment", "")
    return comment[len("labfleet:"):] if comment.startswith("labfleet:") else None


def cluster_name() -> str | None:
    done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    found = re.search(r"^ClusterName\s*=\s*(\S+)", done.stdout, re.MULTILINE)
    return found.group(1) if found else None


def job_runs(jid: str, tracking_uri: str) -> list[Any]:
    """The MLflow runs the job's drivers opened (tag `labfleet.slurm_job`), parents first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    query = f"tags.`{tag.SLURM_JOB}` = '{jid}'"
    cluster = cluster_name()
    if cluster:  # job ids are a cluster's own: another cluster's job 7 may write to the same store
        query += f" and tags.`{tag.SLURM_CLUSTER}` = '{cluster}'"
    runs = client.search_runs(experiments, query, max_results=5000, order_by=["attributes.start_time ASC"])
    order = {"suite": 0, "sweep": 1, "trial": 2, "seed": 3}
    return sorted(runs, key=lambda r: order.get(r.data.tags.get(tag.ROLE, ""), 9))


def status(text: str, console: Console) -> int:
    jid = job_id(text)
    fields = _known(jid, "status")
    restarts = fields.get("Restarts", "0")
    console.print(f"{PREFIX}{jid}: {_state(fields)}  requeued {restarts} time(s)  nodes {fields.get('NodeList')}  "
                  f"elapsed {fields.get('RunTime')}  exit {fields.get('ExitCode')}", highlight=False)
    reason = fields.get("Reason", "None")
    if reason not in ("None", "(null)"):
        console.print(f"  reason: {reason}", highlight=False)
    console.print(f"  output: {fields.get('StdOut')}", highlight=False)
    uri = tracking_of(fields)
    if uri is None:
        return 0
    from labfleet.tracking.uri import redact_uri

    try:
        runs = job_runs(jid, uri)
    except Exception as exc:  # noqa: BLE001 - the store may be down; the job's state is still worth showing
        console.print(f"  runs: {redact_uri(uri)} cannot be read: {str(exc).splitlines()[0] if str(exc) else exc}",
                      highlight=False)
        return 0
    console.print(f"  runs in {redact_uri(uri)}: {len(runs)}", highlight=False)
    for run in runs:
        tags = run.data.tags
        console.print(f"    {tags.get(tag.ROLE, '?'):6} {run.info.status:9} {run.info.run_name}  "
                      f"{run.info.run_id}", highlight=False)
    return 0


def _print_new(path: Path, shown: int) -> int:
    try:
        with path.open("rb") as handle:
            handle.seek(shown)
            data = handle.read()
    except OSError:
        return shown
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return shown + len(data)


def follow(jid: str, console: Console, poll: float = 1.0) -> int:
    """The job's output as it grows, until it ends for good (a requeued job goes on); the exit code its end
    state maps to (a failed driver's own code)."""
    shown = 0
    while True:
        fields = _known(jid, "logs")
        if fields.get("StdOut"):
            shown = _print_new(Path(fields["StdOut"]), shown)
        state = _state(fields)
        if state not in ACTIVE:
            console.print(f"job {PREFIX}{jid}: {state}", highlight=False)
            if state in EXIT_BY_STATE:
                return EXIT_BY_STATE[state]
            code = fields.get("ExitCode", "1:0").split(":")[0]
            return int(code) if code.isdigit() and int(code) else 1
        time.sleep(poll)


def logs(text: str, follow_logs: bool, console: Console) -> int:
    jid = job_id(text)
    if follow_logs:
        return follow(jid, console)
    fields = _known(jid, "logs")
    _print_new(Path(fields.get("StdOut", "")), 0)
    return 0


def stop(text: str, console: Console, wait_seconds: float = 180.0) -> int:
    """scancel: every process of the job gets SIGTERM; the driver ends its runs KILLED, the nodes' Ray stops."""
    jid = job_id(text)
    fields = _known(jid, "stop")
    if _state(fields) not in ACTIVE:
        console.print(f"job {PREFIX}{jid} had already ended ({_state(fields)})", highlight=False)
        return 0
    done = subprocess.run(["scancel", jid], capture_output=True, text=True)
    if done.returncode != 0:
        raise SpecError([Problem("labfleet stop", "JOB", f"{PREFIX}{jid}: scancel: {done.stderr.strip()}")])
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        state = _state(_known(jid, "stop"))
        if state not in ACTIVE:
            console.print(f"job {PREFIX}{jid}: {state}", highlight=False)
            return 0
        time.sleep(1)
    console.print(f"job {PREFIX}{jid} is still stopping", highlight=False)
    return 1
