"""The Ray cluster of one SLURM job, started by the job itself (`labfleet submit --slurm` writes the script):

    python -m labfleet.orchestration.slurm_node address   # the head's GCS address, ip:port
    srun ... python -m labfleet.orchestration.slurm_node node   # one task a node: the head on node 0, workers elsewhere
    python -m labfleet.orchestration.slurm_node wait --nodes N [--timeout S]

Every port a node uses is explicit and derived from the job id and the node's index in the job, so that two
jobs sharing a machine (or logical nodes of one host) never collide, and the head is found by its index, not by
its IP. Each node's Ray runs in the foreground (`ray start --block`) under this process (the head's session
directory is `/tmp/lf-JOBID`). Ray's processes hold SIGTERM blocked, so that when SLURM signals the whole job
the driver can still end its runs through Ray; this process stops its Ray, every process under it and nothing
else (a bare `ray stop` would kill every Ray process on the machine) on SIGUSR1 from the job script, or a grace
period after SIGTERM. The token comes from the job's environment
($RAY_AUTH_TOKEN, made fresh by the job script), never from the command line.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from labfleet.processes import kill_tree

PORTS_PER_NODE = 40
FIRST_PORT = 10000
NODE_SLOTS = 550  # 10000 + 550 * 40 = 32000: below the kernel's ephemeral range (32768 and up on Linux)
MAX_NODES_PER_HOST = 8
DRIVER_GRACE = 20.0  # seconds Ray outlives a SIGTERM while the driver ends its runs


def node_base_port(job_id: int, node_index: int) -> int:
    """The first of the 40 ports node `node_index` of job `job_id` uses."""
    return FIRST_PORT + PORTS_PER_NODE * ((job_id * MAX_NODES_PER_HOST + node_index) % NODE_SLOTS)


def gcs_port(job_id: int) -> int:
    return node_base_port(job_id, 0) + 36


def node_port_args(base: int) -> list[str]:
    return ["--min-worker-port", str(base), "--max-worker-port", str(base + 29),
            "--node-manager-port", str(base + 30), "--object-manager-port", str(base + 31),
            "--runtime-env-agent-port", str(base + 32), "--dashboard-agent-grpc-port", str(base + 33),
            "--dashboard-agent-listen-port", str(base + 34), "--metrics-export-port", str(base + 35)]


def node_address(node_name: str) -> str:
    """The IP address SLURM reaches `node_name` at (its NodeAddr), resolved."""
    out = subprocess.run(["scontrol", "show", "node", node_name, "-o"], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return socket.gethostbyname(fields.get("NodeAddr") or node_name)


def job_nodes() -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def head_address() -> str:
    return f"{node_address(job_nodes()[0])}:{gcs_port(int(os.environ['SLURM_JOB_ID']))}"


def _kill_tree(process: subprocess.Popen) -> None:
    """`process` and everything under it, with SIGKILL (they hold SIGTERM blocked)."""
    kill_tree(process.pid, include_root=True)
    process.wait()


def ray_command(job_id: int, index: int, ip: str, head: str) -> list[str]:
    base = node_base_port(job_id, index)
    cpus = os.environ.get("SLURM_CPUS_ON_NODE")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    ray = str(Path(sys.executable).with_name("ray"))
    command = [ray if Path(ray).exists() else "ray", "start", "--block", "--node-ip-address", ip,
               "--disable-usage-stats", *node_port_args(base)]
    if index == 0:
        command += ["--head", "--port", str(gcs_port(job_id)), "--ray-client-server-port", str(base + 37),
                    "--include-dashboard", "false", "--temp-dir", f"/tmp/lf-{job_id}"]
    else:
        command += ["--address", head]
    if cpus:
        command += ["--num-cpus", cpus]
    if gpus:
        command += ["--num-gpus", gpus.split(":")[-1]]
    return command


def run_node() -> int:
    """This task's Ray node, in the foreground until SIGTERM (or until Ray exits)."""
    job_id, index = int(os.environ["SLURM_JOB_ID"]), int(os.environ["SLURM_NODEID"])
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    head = head_address()
    if index > 0:
        host, port = head.rsplit(":", 1)
        deadline = time.monotonic() + 120
        while True:  # the head first
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"labfleet: node {name}: the Ray head at {head} did not start within 120 s", flush=True)
                    return 1
                time.sleep(0.5)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_ADDRESS", None)
    command = ray_command(job_id, index, node_address(name), head)
    print(f"labfleet: node {name}: Ray {'head' if index == 0 else 'worker'} "
          f"({'GCS ' + head if index == 0 else 'joining ' + head})", flush=True)
    log = Path(f"/tmp/lf-{job_id}-node{index}.log")  # Ray's start-up banner; shown only when Ray fails
    # SLURM signals every process of the job at once (requeue, preemption, scancel). Ray's processes inherit
    # SIGTERM and SIGINT blocked, so Ray keeps serving the driver while it ends its runs; this process takes
    # the signals itself and stops Ray when the job script says the driver is done (SIGUSR1), or
    # `DRIVER_GRACE` seconds after SIGTERM, before SLURM's KillWait ends everything with SIGKILL.
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    stopping, until = False, math.inf
    while process.poll() is None and time.monotonic() < until:
        got = signal.sigtimedwait(held, 0.2)
        if got is None:
            continue
        stopping = True
        until = time.monotonic() if got.si_signo == signal.SIGUSR1 else min(until, time.monotonic() + DRIVER_GRACE)
    code = process.poll()
    _kill_tree(process)
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if index == 0:
        shutil.rmtree(f"/tmp/lf-{job_id}", ignore_errors=True)
    if stopping or code == 0:
        return 0
    tail = "\n".join(text.strip().splitlines()[-12:])
    print(f"labfleet: node {name}: Ray exited with code {code}:\n{tail}", flush=True)
    return 1


def _gone(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for_nodes(nodes: int, timeout: float, watch: int | None = None) -> int:
    """Until the job's Ray cluster has `nodes` live nodes; exit 1 with why after `timeout` seconds, or as soon
    as the process `watch` (the nodes' srun) has ended. Ray is asked from a child process (`probe`), which this
    one ends when the nodes are gone: a client of a GCS that never answers would wait for minutes."""
    probe = subprocess.Popen([sys.executable, "-m", "labfleet.orchestration.slurm_node", "probe", "--nodes",
                              str(nodes), "--timeout", str(timeout)])
    deadline = time.monotonic() + timeout + 30
    while probe.poll() is None:
        if _gone(watch) or time.monotonic() > deadline:
            probe.kill()
            probe.wait()
            why = "the Ray nodes' step ended" if _gone(watch) else f"no answer within {timeout:.0f} s"
            print(f"labfleet: the job's Ray cluster did not start: {why} (each node's output is above)", flush=True)
            return 1
        time.sleep(0.5)
    return probe.returncode


def probe_nodes(nodes: int, timeout: float) -> int:
    os.environ["RAY_AUTH_MODE"] = "token"
    address = head_address()
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"labfleet: the Ray head at {address} did not start within {timeout:.0f} s", flush=True)
                return 1
            time.sleep(0.5)
    import logging

    import ray

    ray.init(address=address, logging_level=logging.ERROR, include_dashboard=False, log_to_driver=False)
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node.get("Alive"))
            if alive >= nodes:
                print(f"labfleet: Ray cluster ready: {alive} node(s), GCS {address}", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(f"labfleet: only {alive} of {nodes} Ray nodes joined within {timeout:.0f} s (each node's "
                      "output is above)", flush=True)
                return 1
            time.sleep(0.5)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labfleet.orchestration.slurm_node")
    parser.add_argument("what", choices=["address", "node", "wait", "probe"])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--watch", type=int, default=None)
    args = parser.parse_args(argv)
    if args.what == "address":
        print(head_address())
        return 0
    if args.what == "node":
        return run_node()
    if args.what == "probe":
        return probe_nodes(args.nodes, args.timeout)
    return wait_for_nodes(args.nodes, args.timeout, args.watch)


if __name__ == "__main__":
    sys.exit(main())
