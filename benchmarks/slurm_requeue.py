"""`labfleet submit --slurm` on a throwaway one-host SLURM cluster (deploy/local/slurm-cluster.sh, two logical
nodes) with a local MLflow tracking server: the time from `submit` to the first metric in the store, and what a
requeue costs (SLURM's own 2-minute hold of a requeued job is skipped with `scontrol update StartTime=now`).

    python benchmarks/slurm_requeue.py [--steps 1000000] [--requeue-after 15]

Needs root (slurmd) and Debian's slurm-wlm. Prints one JSON line; the results are in docs/cluster.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "local"


def _job_runs(client: MlflowClient, job: str) -> list:
    everywhere = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(everywhere, f"tags.`labfleet.slurm_job` = '{job}'", max_results=100))


def _seed_steps(client: MlflowClient, job: str) -> list[list]:
    """Each seed run's `time/env_steps` history (step, timestamp in seconds)."""
    out = []
    for run in _job_runs(client, job):
        if run.data.tags.get("labfleet.role") == "seed":
            out.append(sorted((m.step, m.timestamp / 1000) for m in
                              client.get_metric_history(run.info.run_id, "time/env_steps")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--requeue-after", type=float, default=15.0, help="seconds after the first metric")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lfbench-"))
    slurm_dir = Path(tempfile.mkdtemp(prefix="lfslurm-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(SLURM_CONF=str(slurm_dir / "slurm.conf"), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    tracking = "http://127.0.0.1:5097"
    run = lambda *a, **k: subprocess.run([str(x) for x in a], env=env, capture_output=True, text=True,  # noqa: E731
                                         check=True, **k).stdout
    try:
        run("bash", DEPLOY / "slurm-cluster.sh", "start", "--dir", slurm_dir, "--port", "16977")
        run("bash", DEPLOY / "mlflow-server.sh", "start", "--dir", work / "mlflow", "--port", "5097")
        shutil.copy(REPO / "experiments" / "cartpole_reinforce.yaml", work)
        client = MlflowClient(tracking)
        submitted = time.time()
        out = run(sys.executable, "-m", "labfleet", "submit", "cartpole_reinforce.yaml", "--slurm", "--nodes", "2",
                  "--cpus-per-node", "1", "--tracking-uri", tracking, "--set", "seeds=[0,1]", "--set",
                  f"budget.env_steps={args.steps}", "--set", "eval={episodes: 2, every_steps: 8192}", cwd=work)
        job = re.search(r"slurm:(\d+)", out).group(1)
        while not all(_seed_steps(client, job)) or len(_seed_steps(client, job)) < 2:
            time.sleep(0.2)
        first_metric = min(h[0][1] for h in _seed_steps(client, job)) - submitted
        time.sleep(args.requeue_after)
        run("scontrol", "requeue", job)
        requeued = time.time()
        before = {i: h[-1][0] for i, h in enumerate(_seed_steps(client, job))}
        while "PENDING" not in run("scontrol", "show", "job", "-o", job):
            time.sleep(0.2)
        pending = time.time()
        run("scontrol", "update", f"jobid={job}", "StartTime=now")
        released = time.time()
        while True:
            histories = _seed_steps(client, job)
            later = [[(s, t) for s, t in h if t > released] for h in histories]
            if all(later):
                break
            time.sleep(0.2)
        back = min(h[0][1] for h in later) - released
        first_new = {i: later[i][0][0] for i in range(len(later))}
        subprocess.run([sys.executable, "-m", "labfleet", "logs", f"slurm:{job}", "--follow"], env=env,
                       capture_output=True, timeout=900)
        print(json.dumps({"submit_to_first_metric_s": round(first_metric, 1),
                          "requeue_to_pending_s": round(pending - requeued, 1),
                          "release_to_first_new_metric_s": round(back, 1),
                          "last_step_before_requeue": before, "first_step_after_release": first_new,
                          "checkpoint_interval_steps": 8192,
                          "status": run(sys.executable, "-m", "labfleet", "status", f"slurm:{job}").splitlines()[0]}))
    finally:
        subprocess.run(["bash", str(DEPLOY / "slurm-cluster.sh"), "stop", "--dir", str(slurm_dir)], env=env)
        subprocess.run(["bash", str(DEPLOY / "mlflow-server.sh"), "stop", "--dir", str(work / "mlflow")], env=env)
        shutil.rmtree(slurm_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
