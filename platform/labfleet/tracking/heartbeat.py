"""Driver heartbeats on open runs, and `labfleet reconcile` for runs whose driver is gone.

A driver killed with SIGKILL (or a machine that lost power) leaves its runs RUNNING for ever: MLflow
cannot tell them from live ones (MLflow #3932). So every run a driver opens carries two tags:
- `labfleet.driver`: who drives it, `host:pid:boot:start` (the process's start time since this boot, so
  that a reused pid is not mistaken for the driver);
- `labfleet.heartbeat`: seconds since the epoch, renewed every `HEARTBEAT_SECONDS` while the run is open.
A driver inside a SLURM job adds the job and its start to its host (`host/slurm-JOB.START`): once SLURM has
requeued the job, the driver of its next start knows every earlier start's driver is gone, on any node.
`reconcile` ends RUNNING runs KILLED when their driver is provably dead (same host, and no process with
that pid and start time), or, for a driver on another host, when its heartbeat is older than
`stale_after` seconds. A run of a live driver is never touched.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import labfleet.tracking.tags as tag

HEARTBEAT_SECONDS = 30.0
STALE_AFTER = 5 * HEARTBEAT_SECONDS  # a live driver on another host renews its runs well within this


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces and ")"




def slurm_start() -> tuple[str, int] | None:
    """(job id, how many times SLURM has requeued it) when this process runs inside a SLURM job."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return job, int(restarts) if restarts.isdigit() else 0


def launcher_tags() -> dict[str, str]:
    """Tags naming the batch job a driver runs in (`labfleet status slurm:<jobid>` finds its runs by them)."""
    start = slurm_start()
    if not start:
        return {}
    return {tag.SLURM_JOB: start[0], tag.SLURM_CLUSTER: os.environ.get("SLURM_CLUSTER_NAME", "")}


def driver_identity(pid: int | None = None) -> str:
    host = socket.gethostname()
    start = slurm_start() if pid is None else None
    if start:
        host += f"/slurm-{start[0]}.{start[1]}"
    pid = os.getpid() if pid is None else pid
    return f"{host}:{pid}:{_boot_id()}:{_start_ticks(pid) or '-'}"


def requeued(identity: str) -> bool:
    """Whether `identity` is the driver of an earlier start of the SLURM job this process runs in."""
    found = re.search(r"/slurm-([0-9_]+)\.(\d+):", identity)
    start = slurm_start()
    return bool(found and start and found.group(1) == start[0] and int(found.group(2)) < start[1])


def driver_alive(identity: str) -> bool | None:
    """True or False when this machine can tell (the driver ran here, since this boot, or in an earlier start
    of this SLURM job), else None."""
    if requeued(identity):
        return False
    try:
        host, pid, boot, start = identity.rsplit(":", 3)
    except ValueError:
        return None
    if host.split("/slurm-")[0] != socket.gethostname() or boot != _boot_id() or start == "-":
        return None
    return _start_ticks(int(pid)) == start


class Heartbeat(threading.Thread):
    """Calls `beat()` every `interval` seconds until `stop()`."""

    def __init__(self, beat: Callable[[], None], interval: float = HEARTBEAT_SECONDS):
        super().__init__(name="labfleet-heartbeat", daemon=True)
        self.beat, self.interval = beat, interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a store hiccup: the next beat tries again; the run's end state is what matters
                continue

    def stop(self) -> None:
        self._stopped.set()


@dataclass
class Stale:
    run: Any  # mlflow.entities.Run
    reason: str


def last_beat(tags: dict[str, str], start_time_ms: int) -> float:
    """When a run's driver last showed life: its heartbeat tag, else (no tag, or one that is not a number,
    as a foreign tool may write) the run's start."""
    try:
        beat = float(tags.get(tag.HEARTBEAT, ""))
    except ValueError:
        beat = math.nan
    return beat if math.isfinite(beat) else start_time_ms / 1000


def driver_gone(identity: str | None, beat: float, stale_after: float = STALE_AFTER,
                now: float | None = None) -> str | None:
    """Why the driver `identity`, last seen alive at `beat`, is gone; None while it may still be working.
    A driver on this machine is gone when its process is (provably); one elsewhere when its heartbeat is
    older than `stale_after` seconds."""
    alive = driver_alive(identity) if identity else None
    if alive:
        return None
    if alive is False:
        return f"its driver ({identity}) is no longer running"
    age = (time.time() if now is None else now) - beat
    if age > stale_after:
        what = f"driver {identity}" if identity else "no driver heartbeat"
        return f"{what}; last sign of life {age:.0f} s ago"
    return None


def live_owner(run: Any, stale_after: float = STALE_AFTER) -> str | None:
    """The identity of another driver that still owns `run` (RUNNING, its driver alive or its heartbeat
    fresh), else None: an ended run, a run of a dead driver, or one this process opened. Only such runs
    may be taken over (continued, reopened, ended) by a new driver."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    identity = tags.get(tag.DRIVER)
    if identity == driver_identity():
        return None
    if driver_gone(identity, last_beat(tags, run.info.start_time), stale_after) is not None:
        return None
    return identity or "a driver without an identity"


def stale_runs(client: Any, stale_after: float = STALE_AFTER, now: float | None = None) -> list[Stale]:
    """RUNNING runs whose driver is gone, with why, in every experiment of the store."""
    found = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'",
                                      max_results=50_000):
            tags = run.data.tags
            reason = driver_gone(tags.get(tag.DRIVER), last_beat(tags, run.info.start_time), stale_after, now)
            if reason is not None:
                found.append(Stale(run, reason))
    return found


def reconcile(client: Any, stale_after: float = STALE_AFTER) -> list[Stale]:
    """End every stale run KILLED (children before parents), tagged with when and why; returns them."""
    stale = stale_runs(client, stale_after)
    order = {"seed": 0, "trial": 1, "sweep": 2, "suite": 3}
    stale.sort(key=lambda s: order.get(s.run.data.tags.get(tag.ROLE, ""), 9))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for item in stale:
        client.set_tag(item.run.info.run_id, tag.RECONCILED, f"{stamp}: {item.reason}")
        client.set_terminated(item.run.info.run_id, "KILLED")
    return stale


def stale_note(client: Any) -> str | None:
    """One sentence for `labfleet report` and `labfleet ui` when the store holds orphaned runs."""
    stale = stale_runs(client)
    if not stale:
        return None
    return (f"note: {len(stale)} run(s) are RUNNING but their driver is gone (e.g. {stale[0].run.info.run_id}: "
            f"{stale[0].reason}); `labfleet reconcile` ends them KILLED")
