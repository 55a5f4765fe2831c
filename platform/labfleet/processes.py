"""Process trees, read from /proc (Linux): what a command or a SLURM node step started, ended with SIGKILL
without leaving a process behind. Only the standard library: the CLI's last moments and the SLURM node step
use it."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    order, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        order.append(child)
        queue.extend(children.get(child, []))
    return order


def kill_tree(pid: int, *, include_root: bool) -> None:
    """SIGKILL everything below `pid` (and `pid` itself with `include_root`). The processes are stopped
    first, parents before children, until no new one appears, then killed, children first: a process forked
    after a single reading of /proc (a starting raylet forks the workers it starts ahead) would otherwise
    outlive its killed parent. A process that has gone meanwhile is skipped."""
    stopped: set[int] = set()
    for _ in range(50):  # a round reads /proc once; a stopped process forks nothing more
        new = [p for p in ([pid] if include_root else []) + descendants(pid) if p not in stopped]
        if not new:
            break
        for p in new:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGSTOP)
            stopped.add(p)
    for p in [*reversed(descendants(pid)), *([pid] if include_root else [])]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
