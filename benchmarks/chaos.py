"""Chaos soak: a suite runs on a two-node local Ray cluster while a seeded killer SIGKILLs
a random trial actor, rollout worker or data-parallel rank every 10 to 30 s, and once a whole worker node
(which comes back a little later). The same suite first runs undisturbed on the same cluster as the
reference. Then, read back from both MLflow stores with MlflowClient:

- every seed run FINISHED, nothing RUNNING, the retries recorded (`labfleet.retries`);
- no metric history of any run holds a step twice;
- each seed's final evaluation and final checkpoint (every tensor and number in it: networks, optimisers,
  replay buffers, environments, generators) equal the reference's, bit for bit.

    python benchmarks/chaos.py [--seed 0] [--every 10 30] [--kills 10] [--no-node-kill] [--short] [--keep DIR]

At most `--kills` kills (each one a restart from the last checkpoint; a killer much faster than the
trials' checkpoint interval would only ever redo the same work).

`--short` is a small version (1 seed each, about a minute). Exit 0 when every
assertion holds, 1 otherwise; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from mlflow.tracking import MlflowClient

from labfleet.testing import state_differences

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
CLUSTER = REPO / "deploy" / "local" / "ray-cluster.sh"
KINDS = {"trial actor": "ray::TrialWorker", "rollout worker": "ray::RolloutWorker",
         "data-parallel rank": "ray::DataParallelRank"}


def suite(short: bool) -> dict[str, Any]:
    """PPO with a rollout worker, DQN, and a data-parallel VAE, each with retries to spare."""
    retries = {"resources.max_retries": 100}
    return {"name": "chaos", "experiments": [
        {"spec": str(EXPERIMENTS / "cartpole_ppo.yaml"), "set": {
            "name": "chaos-ppo", "seeds": [0] if short else [0, 1], "budget.env_steps": 16384 if short else 49152,
            "resources.rollout_workers": 1, "eval": {"episodes": 5, "every_steps": 2048}, **retries}},
        {"spec": str(EXPERIMENTS / "cartpole_dqn.yaml"), "set": {
            "name": "chaos-dqn", "seeds": [0] if short else [0, 1], "budget.env_steps": 6144 if short else 20480,
            "eval": {"episodes": 5, "every_steps": 1024}, **retries}},
        {"spec": str(EXPERIMENTS / "digits_vae.yaml"), "set": {
            "name": "chaos-vae", "seeds": [0], "budget.epochs": 6 if short else 10, "hparams.early_stopping": None,
            "hparams.iwae_samples": 1, "resources.data_parallel": 2, "eval": {"every_steps": 12}, **retries}},
    ]}


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["RAY_AUTH_MODE"] = "token"
    return out


def cluster_command(*args: str) -> str:
    result = subprocess.run(["bash", str(CLUSTER), *args], env=env(), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ray-cluster.sh {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout


def targets(ray_dir: Path, min_age: float = 0.0) -> dict[str, list[int]]:
    """The cluster's processes of each kind (children of its raylets) that have lived `min_age` seconds (so
    that a kill lands after some progress, usually past a checkpoint)."""
    found: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "raylet" not in cmdline.split(" ")[0] or str(ray_dir) not in cmdline:
            continue
        for child in proc.children(recursive=True):
            try:
                args = " ".join(child.cmdline())
            except psutil.Error:
                continue
            for kind, title in KINDS.items():
                if args.startswith(title) and time.time() - child.create_time() >= min_age:
                    found[kind].append(child.pid)
    return found


class Killer(threading.Thread):
    """SIGKILLs a random target every `every` seconds while the suite runs; the node once, mid-way."""

    def __init__(self, proc: subprocess.Popen, ray_dir: Path, port: int, seed: int, every: tuple[float, float],
                 node_kill: bool, cpus: int, limit: int):
        super().__init__(daemon=True)
        self.limit = limit
        self.proc, self.ray_dir, self.port, self.cpus = proc, ray_dir, port, cpus
        self.rng, self.every, self.node_kill = random.Random(seed), every, node_kill
        self.kills: list[dict[str, Any]] = []
        self.started = self.last_kill = time.monotonic()
        self.min_age = min(every)

    def run(self) -> None:
        count = 0
        while self.proc.poll() is None and len(self.kills) < self.limit:
            time.sleep(self.rng.uniform(*self.every))
            if self.proc.poll() is not None:
                return
            count += 1
            at = round(time.monotonic() - self.started, 1)
            if self.node_kill and count == 3:  # once: a whole worker node, back 15 s later
                cluster_command("stop-node", "1", "--dir", str(self.ray_dir))
                self.kills.append({"at_s": at, "what": "worker node"})
                print(f"[chaos] {at:7.1f} s  killed worker node 1", flush=True)
                time.sleep(15)
                cluster_command("start-node", "1", "--dir", str(self.ray_dir), "--port", str(self.port),
                                "--cpus-per-node", str(self.cpus))
                continue
            live = {kind: pids for kind, pids in targets(self.ray_dir, self.min_age).items() if pids}
            unused = sorted(set(KINDS) - {k["what"] for k in self.kills})
            # Every kind once first: wait (up to a minute) for a kind not killed yet to be running.
            waited = time.monotonic() - self.last_kill
            if not live or (unused and not set(unused) & set(live) and waited < 60):
                continue
            kind = self.rng.choice(sorted(set(unused) & set(live)) or sorted(live))
            pid = self.rng.choice(sorted(live[kind]))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"at_s": at, "what": kind, "pid": pid})
            self.last_kill = time.monotonic()
            print(f"[chaos] {at:7.1f} s  killed {kind} {pid}", flush=True)


def run_suite(suite_file: Path, uri: str, port: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "labfleet", "suite", str(suite_file), "--tracking-uri", uri,
                             "--address", f"127.0.0.1:{port}", "--quiet"], cwd=cwd, env=env(), text=True)


def seed_runs(client: MlflowClient) -> dict[tuple[str, str], Any]:
    experiment = client.get_experiment_by_name("chaos")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = {r.info.run_id: r.data.tags.get("mlflow.runName", "") for r in runs}
    return {(names[r.data.tags["mlflow.parentRunId"]].split(" #")[0], r.data.tags["labfleet.seed"]): r
            for r in runs if r.data.tags.get("labfleet.role") == "seed"}


def final_state(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, Any]:
    local = client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp / run_id))
    return torch.load(io.BytesIO(Path(local).read_bytes()), weights_only=True)


def compare(reference_uri: str, chaos_uri: str, tmp: Path) -> dict[str, Any]:
    ref_client, client = MlflowClient(reference_uri), MlflowClient(chaos_uri)
    reference, chaos = seed_runs(ref_client), seed_runs(client)
    problems: list[str] = []
    if set(reference) != set(chaos):
        problems.append(f"other seeds: {sorted(reference)} against {sorted(chaos)}")
    experiment = client.get_experiment_by_name("chaos")
    every_run = client.search_runs([experiment.experiment_id], max_results=1000)
    running = [r.info.run_id for r in every_run if r.info.status == "RUNNING"]
    if running:
        problems.append(f"runs left RUNNING: {running}")
    duplicates = 0
    for run in every_run:
        for name in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            if len(steps) != len(set(steps)):
                duplicates += 1
                problems.append(f"{run.data.tags.get('mlflow.runName')}: {name} repeats a step")
    equal, retries, resumes = 0, 0, {}
    for key, run in sorted(chaos.items()):
        retries += int(run.data.tags.get("labfleet.retries", 0))
        resumes[f"{key[0]}/seed={key[1]}"] = run.data.tags.get("labfleet.resume", "-")
        if run.info.status != "FINISHED":
            problems.append(f"{key}: {run.info.status}")
            continue
        ref = reference.get(key)
        if ref is None:
            continue
        evals = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
        ref_evals = {k: v for k, v in ref.data.metrics.items() if k.startswith("eval/")}
        differ = state_differences(final_state(client, run.info.run_id, tmp),
                                   final_state(ref_client, ref.info.run_id, tmp))
        if evals != ref_evals or differ:
            problems.append(f"{key}: final evaluation or state differs from the reference "
                            f"({differ[:5]}{' ...' if len(differ) > 5 else ''})")
        else:
            equal += 1
    return {"seeds": len(chaos), "equal_to_reference": equal, "retries": retries, "duplicate_histories": duplicates,
            "left_running": len(running), "resume_tags": resumes, "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the killer's seed")
    parser.add_argument("--every", type=float, nargs=2, default=(10.0, 30.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--kills", type=int, default=10, help="at most this many kills")
    parser.add_argument("--no-node-kill", action="store_true")
    parser.add_argument("--short", action="store_true", help="the small suite of the tests")
    parser.add_argument("--cpus-per-node", type=int, default=3, help="advertised (more than the machine has: "
                        "every trial of the suite runs at once)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stores here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the cluster
    work = Path(tempfile.mkdtemp(prefix="labfleet-chaos-"))
    ray_dir = Path(tempfile.mkdtemp(prefix="lfchaos-", dir="/tmp"))
    suite_file = work / "chaos.yaml"
    suite_file.write_text(yaml.safe_dump(suite(args.short), sort_keys=False))
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_ports  # type: ignore[import-not-found]  # kernel-chosen ports

    port, dashboard = free_ports(2)
    uris = {name: f"sqlite:///{work / f'{name}.db'}" for name in ("reference", "chaos")}
    summary: dict[str, Any] = {}
    try:
        cluster_command("start", "--workers", "1", "--cpus-per-node", str(args.cpus_per_node), "--dir", str(ray_dir),
                        "--port", str(port), "--dashboard-port", str(dashboard))
        started = time.monotonic()
        reference = run_suite(suite_file, uris["reference"], port, work)
        if reference.wait() != 0:
            raise RuntimeError(f"the reference suite failed (exit {reference.returncode})")
        summary["reference_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        chaos = run_suite(suite_file, uris["chaos"], port, work)
        killer = Killer(chaos, ray_dir, port, args.seed, tuple(args.every), not args.no_node_kill,
                        args.cpus_per_node, args.kills)
        killer.start()
        code = chaos.wait()
        killer.join(timeout=60)
        summary.update({"chaos_s": round(time.monotonic() - started, 1), "chaos_exit": code, "kills": killer.kills})
        summary.update(compare(uris["reference"], uris["chaos"], work))
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", "--dir", str(ray_dir)], env=env(), timeout=120, check=False)
        shutil.rmtree(ray_dir, ignore_errors=True)
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    ok = summary.get("chaos_exit") == 0 and not summary.get("problems") and \
        summary.get("equal_to_reference") == summary.get("seeds")
    kills: dict[str, int] = {}
    for kill in summary.get("kills", []):
        kills[kill["what"]] = kills.get(kill["what"], 0) + 1
    print(f"\nkills survived: {kills}; seeds {summary.get('seeds')}, equal to the reference "
          f"{summary.get('equal_to_reference')}, retries {summary.get('retries')}, duplicate histories "
          f"{summary.get('duplicate_histories')}, left RUNNING {summary.get('left_running')}; "
          f"reference {summary.get('reference_s')} s, chaos {summary.get('chaos_s')} s")
    for problem in summary.get("problems", []):
        print(f"  problem: {problem}")
    print(json.dumps({"ok": ok, **summary}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
