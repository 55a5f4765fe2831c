"""`labfleet submit --slurm` on a real SLURM cluster: Debian's slurm-wlm, one host, two logical nodes started by
deploy/local/slurm-cluster.sh (no systemd, auth/none), and an MLflow tracking server on 127.0.0.1. Jobs start
their own Ray cluster across both nodes. A job requeued mid-training (`scontrol requeue`, as a preemption does)
continues the same runs from their checkpoints and ends bit for bit where a fault-free run ends; `labfleet stop`
(scancel) ends every run KILLED and leaves no Ray process behind. Everything a test starts, it stops."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, REPO, free_ports
from tests.orchestration.test_driver_resume import SPEC_RESOLVED, STEPS
from tests.orchestration.test_faults import _assert_same_model_as_a_fault_free_run

DEPLOY = REPO / "deploy" / "local"
POSTGRES_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
RUN_SET = {"seeds": [0, 1], "budget": {"env_steps": STEPS}, "eval": {"episodes": 2, "every_steps": 4096},
           "hparams.n_envs": 4, "hparams.n_steps": 64}


def _missing() -> str | None:
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        return "SLURM (Debian's slurm-wlm) is not installed"
    if os.geteuid() != 0:
        return "slurmd needs root"
    return None


def _slurm_port() -> int:
    """A port P with P..P+2 free (slurmctld and the two slurmds)."""
    import socket

    for _ in range(50):
        base = free_ports(1)[0]
        if base > 65000:
            continue
        try:
            for port in (base + 1, base + 2):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no three consecutive free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI needs a SLURM cluster: {missing} (.ci/run installs slurm-wlm)")
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("slurm")
    slurm_dir = Path(tempfile.mkdtemp(prefix="lfslurm-", dir="/tmp"))
    mlflow_dir = tmp / "mlflow"
    port, (mlflow_port,) = _slurm_port(), free_ports(1)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS",
                                                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "SLURM_JOB_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SLURM_CONF"] = str(slurm_dir / "slurm.conf")
    env["PYTHONUNBUFFERED"] = "1"

    def script(*args: object) -> None:
        done = subprocess.run(["bash", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        script(DEPLOY / "slurm-cluster.sh", "start", "--nodes", 2, "--cpus-per-node", 2, "--dir", slurm_dir,
               "--port", port)
        script(DEPLOY / "mlflow-server.sh", "start", "--dir", mlflow_dir, "--port", mlflow_port)
        yield {"env": env, "dir": tmp, "tracking": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        subprocess.run(["bash", str(DEPLOY / "slurm-cluster.sh"), "stop", "--dir", str(slurm_dir)], env=env,
                       timeout=300, check=False)
        subprocess.run(["bash", str(DEPLOY / "mlflow-server.sh"), "stop", "--dir", str(mlflow_dir)], env=env,
                       timeout=120, check=False)
        shutil.rmtree(slurm_dir, ignore_errors=True)


def _labfleet(slurm: dict, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labfleet", *args], cwd=cwd, env=slurm["env"],
                          capture_output=True, text=True, timeout=timeout)


def _slurm(slurm: dict, *args: str) -> str:
    done = subprocess.run(list(args), env=slurm["env"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _state(slurm: dict, job: str) -> str:
    out = _slurm(slurm, "scontrol", "show", "job", "-o", job)
    return re.search(r"JobState=(\S+)", out).group(1)


def _submit(slurm: dict, workdir: Path, *args: str) -> str:
    done = _labfleet(slurm, "submit", *args, "--slurm", "--nodes", "2", "--cpus-per-node", "1",
                     "--tracking-uri", slurm["tracking"], cwd=workdir, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"slurm:(\d+)", done.stdout).group(1)


def _wait_until(condition, what: str, job: str, slurm: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = _state(slurm, job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.5)


def _job_runs(client: MlflowClient, job: str) -> list:
    """Every run the job's drivers opened, in any experiment."""
    everywhere = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(everywhere, f"tags.`labfleet.slurm_job` = '{job}'", max_results=1000))


def _has_checkpoint(client: MlflowClient, run) -> bool:
    return any(a.path == "checkpoints/latest.pt" for a in client.list_artifacts(run.info.run_id, "checkpoints"))


def _no_repeated_steps(client: MlflowClient, run) -> None:
    for name in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert len(steps) == len(set(steps)), f"{run.info.run_name}: {name} repeats a step: {sorted(steps)}"


def _postgres_database() -> str:
    import sqlalchemy

    name = f"labfleet_{uuid.uuid4().hex[:10]}"
    try:
        engine = sqlalchemy.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - no server: skip here, fail in CI
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI needs PostgreSQL at 127.0.0.1:5432: {exc}") from exc
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    return name


def _ray_processes(job: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"/tmp/lf-{job}|slurm_node"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_dry_run_shows_the_script_and_bad_submissions_are_refused(slurm, tmp_path: Path):
    shutil.copy(EXPERIMENTS / "cartpole_reinforce.yaml", tmp_path)
    done = _labfleet(slurm, "submit", "cartpole_reinforce.yaml", "--slurm", "--nodes", "2", "--partition", "debug",
                     "--time", "0:30:00", "--tracking-uri", slurm["tracking"], "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --requeue", "#SBATCH --partition=debug", "#SBATCH --time=0:30:00",
                 "#SBATCH --exclusive", f"--tracking-uri {slurm['tracking']}", "slurm_node node"):
        assert line in done.stdout, line
    assert "RAY_AUTH_TOKEN=" in done.stdout and not re.search(r"[0-9a-f]{64}", done.stdout)  # made in the job
    assert not (tmp_path / ".labfleet").exists() and not _slurm(slurm, "squeue", "-h")

    # A store only one node sees: refused before anything is written or submitted.
    local = _labfleet(slurm, "submit", "cartpole_reinforce.yaml", "--slurm", "--tracking-uri",
                      f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert local.returncode == 2 and "only one node sees" in local.stderr and "Traceback" not in local.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".labfleet").exists()
    # What sbatch refuses is said, with exit 2.
    partition = _labfleet(slurm, "submit", "cartpole_reinforce.yaml", "--slurm", "--partition", "nosuch",
                          "--tracking-uri", slurm["tracking"], cwd=tmp_path)
    assert partition.returncode == 2 and "sbatch refused the job" in partition.stderr, partition.stderr
    assert "partition" in partition.stderr.lower() and not _slurm(slurm, "squeue", "-h")
    # one backend's options given to the other are refused, not ignored
    mixed = _labfleet(slurm, "submit", "cartpole_reinforce.yaml", "--nodes", "2", cwd=tmp_path)
    assert mixed.returncode == 2 and "--nodes cannot be used with a Ray Jobs submission" in mixed.stderr
    mixed = _labfleet(slurm, "submit", "cartpole_reinforce.yaml", "--slurm", "--address", "http://127.0.0.1:1",
                      cwd=tmp_path)
    assert mixed.returncode == 2 and "--address cannot be used with a SLURM submission" in mixed.stderr
    for bad in ("slurm:x", "slurm:999999"):
        status = _labfleet(slurm, "status", bad, cwd=tmp_path)
        assert status.returncode == 2 and "Traceback" not in status.stderr, status.stderr


def _requeue(slurm: dict, client: MlflowClient, job: str) -> None:
    """`scontrol requeue`, as a preemption does; then the job PENDING, its runs ended by its driver, its Ray gone,
    and the job released (SLURM holds a requeued job for 2 minutes before it may start)."""
    _slurm(slurm, "scontrol", "requeue", job)
    deadline = time.monotonic() + 180
    while _state(slurm, job) != "PENDING":  # RUNNING, then COMPLETING while its processes end
        assert time.monotonic() < deadline, f"job {job} is still {_state(slurm, job)} 180 s after its requeue"
        time.sleep(0.5)
    statuses = {r.info.status for r in _job_runs(client, job)}
    assert statuses <= {"KILLED", "FINISHED"}, statuses  # the driver ended its runs before the job left its nodes
    assert not _ray_processes(job), "Ray processes of the job's earlier start outlived it"
    _slurm(slurm, "scontrol", "update", f"jobid={job}", "StartTime=now")


@pytest.mark.slow
def test_requeued_suite_continues_its_runs_and_its_sweep(slurm, tmp_path: Path):
    """A suite of a run (2 seeds) and a sweep, requeued once while the run trains and once while the sweep does:
    each time SIGTERM reaches the driver, which ends every run KILLED (a sweep's running trials stay RUNNING in
    the study), and the requeued job continues the same runs from their checkpoints and the same study."""
    import optuna

    database = _postgres_database()
    storage = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    shutil.copy(EXPERIMENTS / "cartpole_reinforce.yaml", tmp_path)
    (tmp_path / "sweeps").mkdir()
    shutil.copy(EXPERIMENTS / "sweeps" / "cartpole_ppo_sweep.yaml", tmp_path / "sweeps")
    suite = {"name": "slurm-requeue", "experiments": [
        {"spec": "cartpole_reinforce.yaml", "set": {"name": "rq-reinforce", **RUN_SET}},
        {"spec": "sweeps/cartpole_ppo_sweep.yaml", "sweep": True, "set": {
            "name": "rq-sweep", "budget": {"env_steps": 16384}, "eval": {"episodes": 2, "every_steps": 4096},
            "sweep.n_trials": 3, "sweep.pruner": {"type": "nop"}, "sweep.storage": storage}}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    client = MlflowClient(slurm["tracking"])
    job = _submit(slurm, tmp_path, "suite.yaml")

    def of(prefix: str) -> list:
        return [r for r in _job_runs(client, job) if r.info.run_name.startswith(prefix)]

    def seeds_checkpointed() -> bool:
        seeds = [r for r in of("rq-reinforce") if r.data.tags["labfleet.role"] == "seed"]
        return len(seeds) == 2 and all(_has_checkpoint(client, r) for r in seeds)

    _wait_until(seeds_checkpointed, "checkpoint of both seeds", job, slurm)
    before = {r.info.run_id: r for r in of("rq-reinforce")}
    logged_before = {rid: max(m.step for m in client.get_metric_history(rid, "time/env_steps"))
                     for rid, r in before.items() if r.data.tags["labfleet.role"] == "seed"}
    assert all(step < STEPS for step in logged_before.values())
    _requeue(slurm, client, job)

    def sweep_checkpointed() -> bool:
        training = [r for r in of("rq-sweep") if r.data.tags["labfleet.role"] == "seed" and
                    r.info.status == "RUNNING"]
        return bool(training) and all(_has_checkpoint(client, r) for r in training)

    _wait_until(sweep_checkpointed, "a checkpoint of a sweep trial", job, slurm)
    _requeue(slurm, client, job)
    left = [t for t in optuna.load_study(study_name="rq-sweep", storage=storage).trials if t.state.name == "RUNNING"]
    assert left, "a sweep stopped by SLURM leaves its running trials RUNNING for the next start"

    follow = _labfleet(slurm, "logs", f"slurm:{job}", "--follow", cwd=tmp_path, timeout=600)
    assert follow.returncode == 0, follow.stdout[-4000:] + follow.stderr
    assert "start 3 on" in follow.stdout and "continuing trial run" in follow.stdout
    assert "continuing from checkpoints" in follow.stdout  # a sweep trial, adopted by the third start
    status = _labfleet(slurm, "status", f"slurm:{job}", cwd=tmp_path)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "requeued 2 time(s)" in status.stdout
    assert "rq-reinforce/seed=0" in status.stdout and "RUNNING" not in status.stdout, status.stdout

    after = {r.info.run_id: r for r in of("rq-reinforce")}
    assert set(after) == set(before), "the requeued job made new runs instead of continuing the old ones"
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    nodes = set()
    for run_id, run in after.items():
        if run.data.tags["labfleet.role"] != "seed":
            continue
        nodes.add(run.data.tags["labfleet.node"])
        assert run.data.tags["labfleet.resumed_from"] == "checkpoint" and run.data.tags["labfleet.resume"] == "exact"
        _no_repeated_steps(client, run)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "time/env_steps"))
        assert steps[-1] >= STEPS and logged_before[run_id] in steps
        final = Path(client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp_path))).read_bytes()
        _assert_same_model_as_a_fault_free_run(SPEC_RESOLVED, int(run.data.tags["labfleet.seed"]), final)
    assert len(nodes) == 2, "the seeds did not use both nodes"

    study = optuna.load_study(study_name="rq-sweep", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and not [t for t in study.trials if t.state.name == "RUNNING"]
    adopted = [t for t in complete if t.number in {x.number for x in left}]
    assert adopted, "no trial running at the requeue went on in the same Optuna trial"
    runs = {r.info.run_id: r for r in _job_runs(client, job)}
    for trial in complete:  # each finished trial in one FINISHED run, its seed's steps logged once
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        seeds = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert len(seeds) == 1 and seeds[0].info.status == "FINISHED"
        _no_repeated_steps(client, seeds[0])
    # nothing else unfinished: a run left KILLED belongs to a trial that had no checkpoint (told FAIL, re-asked)
    failed = {t.user_attrs.get("mlflow_run_id") for t in study.trials if t.state.name == "FAIL"}
    for run in runs.values():
        assert run.info.status == "FINISHED" or run.info.run_id in failed or \
            runs.get(run.data.tags.get("mlflow.parentRunId", ""), run).info.run_id in failed, run.info.run_name
    roles = [r.data.tags["labfleet.role"] for r in runs.values()]
    assert roles.count("suite") == 1 and roles.count("sweep") == 1


@pytest.mark.slow
def test_stop_ends_every_run_killed_and_leaves_no_ray_behind(slurm, tmp_path: Path):
    shutil.copy(EXPERIMENTS / "cartpole_reinforce.yaml", tmp_path)
    client = MlflowClient(slurm["tracking"])
    job = _submit(slurm, tmp_path, "cartpole_reinforce.yaml", "--set", "name=slurm-stop", "--set", "seeds=[0,1]",
                  "--set", "budget.env_steps=400000")

    def training() -> bool:
        seeds = [r for r in _job_runs(client, job) if r.data.tags["labfleet.role"] == "seed"]
        return len(seeds) == 2 and all("time/env_steps" in r.data.metrics for r in seeds)

    _wait_until(training, "metrics of both seeds", job, slurm)
    stopped = _labfleet(slurm, "stop", f"slurm:{job}", cwd=tmp_path, timeout=300)
    assert stopped.returncode == 0 and "CANCELLED" in stopped.stdout, stopped.stdout + stopped.stderr
    runs = _job_runs(client, job)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}
    assert not _ray_processes(job), "Ray processes of the job outlived it"
    assert not Path(f"/tmp/lf-{job}").exists()
    logs = _labfleet(slurm, "logs", f"slurm:{job}", cwd=tmp_path)
    assert "every open run was marked KILLED" in logs.stdout


@pytest.mark.slow
def test_a_job_that_fails_before_its_driver_starts_says_why(slurm, tmp_path: Path):
    """The interpreter named for the nodes lacks labfleet: the job fails at once, exit 1, and its log says why."""
    shutil.copy(EXPERIMENTS / "cartpole_reinforce.yaml", tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    job = _submit(slurm, tmp_path, "cartpole_reinforce.yaml", "--python", str(tmp_path / "bare" / "bin" / "python"))
    follow = _labfleet(slurm, "logs", f"slurm:{job}", "--follow", cwd=tmp_path, timeout=300)
    assert follow.returncode == 1 and "FAILED" in follow.stdout, follow.stdout
    assert "No module named 'labfleet'" in follow.stdout and "cannot run labfleet" in follow.stdout, follow.stdout
    assert not _job_runs(MlflowClient(slurm["tracking"]), job)
    assert not _ray_processes(job)
