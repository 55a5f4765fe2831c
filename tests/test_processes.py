"""`labfleet.processes.kill_tree` leaves nothing of a tree that keeps forking while it is killed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from labfleet.processes import descendants, kill_tree

FORKER = """
import subprocess, time
while True:  # a raylet starting its workers, faster
    subprocess.Popen(["sleep", "60"])
    time.sleep(0.002)
"""


def _group(pgid: int) -> list[int]:
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            left.append(int(stat.parent.name))
    return left


def test_a_tree_that_keeps_forking_is_killed_whole():
    root = subprocess.Popen([sys.executable, "-c", FORKER], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(descendants(root.pid)) < 20:
            assert time.monotonic() < deadline, "the tree never grew"
            time.sleep(0.05)
        kill_tree(root.pid, include_root=True)
        root.wait(timeout=10)
        time.sleep(0.5)  # (their zombies are reaped by init)
        assert _group(root.pid) == []
    finally:
        subprocess.run(["pkill", "-KILL", "-g", str(root.pid)], check=False)
