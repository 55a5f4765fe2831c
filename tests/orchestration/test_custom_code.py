"""Your own training code through the whole spine (issue 13 §1-2): a training function and a Trainer
subclass, each in a module outside the package, run, sweep, restart and fail like built-ins; validation
refuses what is neither and never calls it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from labfleet.cli import app
from tests.conftest import EXPERIMENTS, run_cli, trial_worker_pids

CUSTOM = EXPERIMENTS / "custom"


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _download(client: MlflowClient, run_id: str, path: str, tmp: Path) -> dict:
    return torch.load(io.BytesIO(Path(client.download_artifacts(run_id, path, str(tmp))).read_bytes()),
                      weights_only=True)


@pytest.mark.slow
def test_training_function_runs_two_seeds_tracked_like_a_builtin(tmp_path: Path, tracking_uri: str):
    result = run_cli("run", str(CUSTOM / "digits_function.yaml"), "--set", "budget.iterations=4",
                     "--tracking-uri", tracking_uri, cwd=tmp_path)  # another directory: found beside the spec
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri)
    runs = _runs(client, "custom")
    seeds = [r for r in runs if r.data.tags["labfleet.role"] == "seed"]
    (trial,) = [r for r in runs if r.data.tags["labfleet.role"] == "trial"]
    assert len(seeds) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in seeds:
        history = client.get_metric_history(run.info.run_id, "eval/accuracy")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
        assert run.data.metrics["eval/accuracy"] > 0.6  # 4 epochs of an MLP on digits: 0.79 here; chance 0.1
        state = _download(client, run.info.run_id, "checkpoints/final.pt", tmp_path / run.info.run_id)
        assert state["function"]["epoch"] == 4 and "0.weight" in state["function"]["model"]
        assert run.data.params["hparams.learning_rate"] == "0.001"
    assert trial.data.metrics["eval/accuracy"] == pytest.approx(
        sum(r.data.metrics["eval/accuracy"] for r in seeds) / 2)
    assert "eval/accuracy" in result.stdout  # the summary shows the function's own evaluation


@pytest.mark.slow
def test_trainer_subclass_outside_the_package(tmp_path: Path, tracking_uri: str):
    result = run_cli("run", str(CUSTOM / "bandit_trainer.yaml"), "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri)
    seeds = [r for r in _runs(client, "custom") if r.data.tags["labfleet.role"] == "seed"]
    assert len(seeds) == 2 and {r.info.status for r in seeds} == {"FINISHED"}
    for run in seeds:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/regret")] == \
            [1000, 2000, 3000, 4000, 5000]
        assert run.data.metrics["eval/regret"] < 0.5
    shown = run_cli("show", "bandit_trainer:EpsilonGreedyBandit", cwd=CUSTOM)
    assert shown.returncode == 0 and "epsilon: float = 0.1" in shown.stdout


@pytest.mark.slow
def test_sweep_over_a_function_prunes_and_nests(tracking_uri, tmp_path: Path):
    data = yaml.safe_load((CUSTOM / "digits_function_sweep.yaml").read_text())
    data["budget"] = {"iterations": 6}
    data["sweep"].update({"n_trials": 2, "sampler": {"type": "grid"},
                          "pruner": {"type": "threshold", "lower": 0.5, "n_warmup_steps": 2},
                          "space": {"hparams.learning_rate": {"type": "categorical", "choices": [1e-6, 1e-2]}}})
    (tmp_path / "digits_classifier.py").write_text((CUSTOM / "digits_classifier.py").read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    uri, storage = tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("sweep", "sweep.yaml", "--tracking-uri", uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="digits-function-sweep", storage=storage)
    states = {t.params["hparams.learning_rate"]: t.state for t in study.trials}
    assert states == {1e-6: optuna.trial.TrialState.PRUNED, 1e-2: optuna.trial.TrialState.COMPLETE}
    client = MlflowClient(uri)
    runs = _runs(client, "custom")
    (sweep_run,) = [r for r in runs if r.data.tags["labfleet.role"] == "sweep"]
    trials = [r for r in runs if r.data.tags["labfleet.role"] == "trial"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {sweep_run.info.run_id}
    assert {r.data.tags["optuna.state"] for r in trials} == {"PRUNED", "COMPLETE"}
    # a pruned trial is a normal end (issue 17): FINISHED, and its seeds FINISHED with optuna.state=PRUNED
    (pruned,) = [r for r in trials if r.data.tags["optuna.state"] == "PRUNED"]
    assert pruned.info.status == "FINISHED"
    seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pruned.info.run_id]
    assert seeds and {(r.info.status, r.data.tags["optuna.state"]) for r in seeds} == {("FINISHED", "PRUNED")}


RESUMABLE = '''
import time


def main(config, ctx):
    start = ctx.restored["epoch"] if ctx.restored else 0
    for epoch in range(start, ctx.budget):
        time.sleep(0.05)
        ctx.report(epoch + 1, {"custom/started_at": float(start), "eval/score": float(epoch + 1)})
        ctx.checkpoint({"epoch": epoch + 1})
'''

FAILING = '''
def main(config, ctx):
    ctx.report(1, {"eval/score": 1.0})
    raise ValueError("the data file is corrupt")
'''

CALLED = '''
import pathlib


def main(config, ctx):
    pathlib.Path(config["marker"]).write_text("called")


class NotATrainer:
    def __init__(self, config, ctx):
        pass
'''


@pytest.mark.slow
def test_killed_function_resumes_from_ctx_restored(tmp_path: Path, tracking_uri: str):
    (tmp_path / "resumable.py").write_text(RESUMABLE)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "resumable", "algorithm": "resumable:main",
                                                         "budget": {"iterations": 200}, "seeds": [0]}))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "labfleet", "run", "spec.yaml", "--tracking-uri", tracking_uri,
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    client = MlflowClient(tracking_uri)
    try:
        deadline = time.monotonic() + 120
        while True:  # once a checkpoint past step 10 is in the store, kill the trial actor's process
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the function never checkpointed"
            seeds = [r for r in _runs_or_none(client) if r.data.tags["labfleet.role"] == "seed"]
            if seeds and seeds[0].data.metrics.get("eval/score", 0) >= 10 and any(
                    a.path.endswith("latest.pt") for a in client.list_artifacts(seeds[0].info.run_id, "checkpoints")):
                break
            time.sleep(0.2)
        (pid,) = trial_worker_pids(proc.pid)
        os.kill(pid, signal.SIGKILL)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    (seed,) = [r for r in _runs_or_none(client) if r.data.tags["labfleet.role"] == "seed"]
    assert seed.info.status == "FINISHED" and seed.data.tags["labfleet.retries"] == "1"
    started = {m.value for m in client.get_metric_history(seed.info.run_id, "custom/started_at")}
    assert started - {0.0} and min(started - {0.0}) >= 10, f"the function started over: {started}"
    steps = [m.step for m in client.get_metric_history(seed.info.run_id, "eval/score")]
    assert sorted(steps) == list(range(1, 201)), "each step exactly once"


def _runs_or_none(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("resumable")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=100)


@pytest.mark.slow
def test_raising_function_fails_its_run_cleanly(tmp_path: Path, tracking_uri: str):
    (tmp_path / "failing.py").write_text(FAILING)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "failing", "algorithm": "failing:main",
                                                         "budget": {"iterations": 5}, "seeds": [0]}))
    result = run_cli("run", "spec.yaml", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the data file is corrupt" in result.stdout
    runs = _runs(MlflowClient(tracking_uri), "failing")
    assert {r.info.status for r in runs} == {"FAILED"}
    seed = next(r for r in runs if r.data.tags["labfleet.role"] == "seed")
    assert "ValueError: the data file is corrupt" in seed.data.tags["labfleet.error"]
    # the whole traceback is an artifact of the seed run; the terminal had one line per failed seed
    log = Path(MlflowClient(tracking_uri).download_artifacts(seed.info.run_id, "error.txt", str(tmp_path)))
    text = log.read_text()
    assert 'failing.py", line 4, in main' in text and "\x1b[" not in text
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(("algorithm", "word"), [
    ("called:NotATrainer", "must name a labfleet.Trainer subclass or a function main(config, ctx)"),
    ("os:getcwd", "must take (config, ctx)"),
    ("os:sep", "must name a labfleet.Trainer subclass or a function"),
    ("no_such_module_abc:main", "cannot import module"),
])
def test_what_is_neither_is_refused_and_nothing_is_called(tmp_path: Path, algorithm: str, word: str):
    (tmp_path / "called.py").write_text(CALLED)
    marker = tmp_path / "marker"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "algorithm": algorithm, "budget": {"iterations": 5},
                                    "hparams": {"marker": str(marker)}}))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert f"{spec}: algorithm: " in result.output and word in result.output
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"name": "x", "algorithm": "called:main", "budget": {"iterations": 5},
                                  "hparams": {"marker": str(marker)}}))
    assert CliRunner().invoke(app, ["validate", str(ok)]).exit_code == 0
    assert not marker.exists(), "validation called the training function"


@pytest.mark.slow
def test_a_hanging_function_is_reported_and_what_it_reported_is_logged(tmp_path: Path, tracking_uri: str):
    """A function reports three steps, then hangs (until the test lets it go): the driver warns after
    `resources.stall_warning_s`, and the three steps are in the store while it hangs."""
    (tmp_path / "hangs.py").write_text(
        "import time\nfrom pathlib import Path\n\n\ndef main(config, ctx):\n"
        "    for step in (1, 2, 3):\n        ctx.report(step, {'eval/score': float(step)})\n"
        "    while not Path(config['release']).exists():\n        time.sleep(0.1)\n")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "hangs", "algorithm": "hangs:main", "seeds": [0], "budget": {"iterations": 10},
        "hparams": {"release": str(tmp_path / "go")}, "resources": {"stall_warning_s": 3},
        "tracking": {"experiment": "hangs"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "labfleet", "run", str(tmp_path / "spec.yaml"), "--tracking-uri",
                             tracking_uri], cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = MlflowClient(tracking_uri)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()  # (a blocking readline in this thread could wait for ever if the warning never came)
    try:
        deadline = time.monotonic() + 120
        while not any("no progress for 3 s" in line for line in list(lines)):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        seeds = [r for r in _runs(client, "hangs") if r.data.tags["labfleet.role"] == "seed"]
        deadline = time.monotonic() + 30
        while not (seeds and len(client.get_metric_history(seeds[0].info.run_id, "eval/score")) == 3):
            assert time.monotonic() < deadline, "the steps reported before the hang are not in the store"
            time.sleep(0.5)
            seeds = [r for r in _runs(client, "hangs") if r.data.tags["labfleet.role"] == "seed"]
        (tmp_path / "go").touch()
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(lines)
    assert "its code or environment may hang" in "".join(lines)


TRAINERS = '''
import numpy as np
from pydantic import BaseModel

from labfleet import Trainer


class HParams(BaseModel):
    pass


class Counter(Trainer):
    hparams_model = HParams

    def __init__(self, spec, seed, device="cpu"):
        super().__init__(spec, seed, device)
        self.n = 0

    def train_iteration(self):
        self.n += 1
        return {"train/n": float(self.n)}

    def evaluate(self):
        return {"eval/n": float(self.n)}

    @property
    def progress(self):
        return self.n

    def probe(self):
        return np.array([self.n])

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = int(state["n"])


class Incomplete(Trainer):
    hparams_model = HParams

    def train_iteration(self):
        return {}

    def evaluate(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class EvaluateFails(Counter):
    def evaluate(self):
        return {"eval/n": self.table["n"]}


class StateNotWeightsOnly(Counter):
    def state_dict(self):
        return {"n": self.n, "rng": np.random.default_rng(0)}


class Forgets(Counter):
    def load_state_dict(self, state):
        pass


class TrainsOnTheSide(Counter):
    def train_iteration(self):
        return {"eval/n": float(self.n)}, "two values"
'''


@pytest.mark.slow
@pytest.mark.parametrize(("name", "words"), [
    ("Incomplete", ["does not define probe, progress", "docs/your-own-code.md"]),
    ("EvaluateFails", ["evaluate() raised AttributeError", "'EvaluateFails' object has no attribute 'table'",
                       "trainers.py:"]),
    ("StateNotWeightsOnly", ["torch.load(state_dict(), weights_only=True) raised UnpicklingError"]),
    ("Forgets", ["progress is 0 after load_state_dict(), 1 before it"]),
    ("TrainsOnTheSide", ["train_iteration() must return a dict of metric name -> number, got tuple"]),
])
def test_validate_makes_one_round_trip_through_a_trainer_class(tmp_path: Path, name: str, words: list[str]):
    """`labfleet validate` builds the class on a throwaway seed and calls each method the driver calls once:
    the first that is missing or fails is named in one line (exit 2), before anything runs."""
    (tmp_path / "trainers.py").write_text(TRAINERS)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "algorithm": f"trainers:{name}", "budget": {"iterations": 3}}))
    result = run_cli("validate", str(spec), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{spec}: algorithm: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    spec.write_text(yaml.safe_dump({"name": "x", "algorithm": "trainers:Counter", "budget": {"iterations": 3}}))
    result = run_cli("validate", str(spec), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok: "), result.stdout + result.stderr
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()


def test_run_refuses_a_trainer_class_without_a_required_method(tmp_path: Path):
    (tmp_path / "trainers.py").write_text(TRAINERS)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "x", "algorithm": "trainers:Incomplete",
                                                         "budget": {"iterations": 3}}))
    result = run_cli("run", "spec.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "does not define probe, progress" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "mlflow.db").exists()


STEPPER = '''
import numpy as np
from pydantic import BaseModel

from labfleet import Trainer


class HParams(BaseModel):
    n_envs: int = 3


class RandomWalker(Trainer):
    """Random actions on the spec's environments, made with Trainer.make_envs."""

    hparams_model = HParams

    def __init__(self, spec, seed, device="cpu"):
        super().__init__(spec, seed, device)
        self.envs, self.obs = self.make_envs(self.hp.n_envs)
        self.first_obs = self.obs.copy()
        self.steps, self.lengths, self.running = 0, [], np.zeros(self.hp.n_envs, dtype=int)

    def train_iteration(self):
        self.obs, _, terminated, truncated, _ = self.envs.step(self.envs.action_space.sample())
        self.steps += self.hp.n_envs
        self.running += 1
        for i in np.flatnonzero(terminated | truncated):
            self.lengths.append(int(self.running[i]))
            self.running[i] = 0
        return {"train/steps": float(self.steps)}

    def evaluate(self):
        return {"eval/episodes": float(len(self.lengths))}

    @property
    def progress(self):
        return self.steps

    def probe(self):
        return np.asarray(self.obs)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
'''


def test_make_envs_builds_the_spec_environments_as_labfleet_does(tmp_path: Path, monkeypatch):
    """`Trainer.make_envs`: the spec's env with its wrappers, one seed per env index from the trainer's seed."""
    from labfleet.algorithms import registry
    from labfleet.algorithms.roundtrip import check_round_trip
    from labfleet.spec.loading import resolve_spec_data

    (tmp_path / "stepper.py").write_text(STEPPER)
    monkeypatch.chdir(tmp_path)
    data = {"name": "walk", "algorithm": "stepper:RandomWalker", "env": "CartPole-v1", "seeds": [0],
            "budget": {"env_steps": 300}, "env_wrappers": [{"type": "TimeLimit", "kwargs": {"max_episode_steps": 4}}]}
    spec = resolve_spec_data(data, str(tmp_path / "spec.yaml"))
    cls = registry.get(spec.algorithm, str(tmp_path)).trainer
    check_round_trip(cls, spec)
    walker = cls(spec, 0, "cpu")
    for _ in range(20):
        walker.train_iteration()
    assert walker.lengths and max(walker.lengths) <= 4  # the spec's TimeLimit wraps every env
    assert len({tuple(row) for row in walker.first_obs}) == 3  # each env index has its own seed
    first = cls(spec, 0, "cpu").first_obs
    assert (first == walker.first_obs).all() and not (cls(spec, 1, "cpu").first_obs == first).all()


@pytest.mark.slow
def test_enjoy_names_what_a_trainer_of_ones_own_lacks(tmp_path: Path, tracking_uri: str):
    (tmp_path / "trainers.py").write_text(TRAINERS)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "counter", "algorithm": "trainers:Counter",
                                                         "seeds": [0], "budget": {"iterations": 3},
                                                         "tracking": {"experiment": "counter"}}))
    result = run_cli("run", "spec.yaml", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_cli("enjoy", "counter", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 2 and "trainers:Counter has no sample_images()" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_sweep_whose_function_never_reports_its_objective_stops_at_the_first_report(tracking_uri, tmp_path: Path):
    """The objective is checked at the trial's first evaluation: one trial fails with a did-you-mean, no
    other is asked, and the sweep run ends FAILED as the command exits 1."""
    (tmp_path / "typo.py").write_text(
        "import time\n\n\ndef main(config, ctx):\n    for step in range(1, 100):\n"
        "        ctx.report(step, {'eval/scor': float(step)})\n        time.sleep(0.05)\n")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "typo", "algorithm": "typo:main", "seeds": [0], "budget": {"iterations": 100},
        "hparams": {"x": 1.0}, "tracking": {"experiment": "typo"},
        "sweep": {"metric": "eval/score", "direction": "maximize", "n_trials": 6, "max_parallel": 1,
                  "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "nop"},
                  "space": {"hparams.x": {"type": "float", "low": 0.0, "high": 1.0}}}}))
    uri, storage = tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("sweep", "sweep.yaml", "--tracking-uri", uri, "--storage", storage, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "did you mean 'eval/scor'?" in result.stdout and "no further trial was asked" in result.stdout
    study = optuna.load_study(study_name="typo", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    (sweep_run,) = [r for r in _runs(MlflowClient(uri), "typo") if r.data.tags["labfleet.role"] == "sweep"]
    assert sweep_run.info.status == "FAILED" and "eval/score" in sweep_run.data.tags["labfleet.error"]


@pytest.mark.slow
def test_a_function_logs_artifacts_and_images_on_its_seed_run(tmp_path: Path, tracking_uri: str):
    (tmp_path / "media.py").write_text(
        "import numpy as np\n\n\ndef main(config, ctx):\n"
        "    ctx.log_image('ramp', np.linspace(0, 1, 64).reshape(8, 8))\n"
        "    ctx.log_artifact('notes/summary.txt', f'seed {ctx.seed}')\n"
        "    ctx.report(1, {'eval/score': 1.0})\n")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "media", "algorithm": "media:main", "seeds": [3],
                                                         "budget": {"iterations": 1},
                                                         "tracking": {"experiment": "media"}}))
    result = run_cli("run", "spec.yaml", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri)
    (seed,) = [r for r in _runs(client, "media") if r.data.tags["labfleet.role"] == "seed"]
    notes = Path(client.download_artifacts(seed.info.run_id, "notes/summary.txt", str(tmp_path)))
    image = Path(client.download_artifacts(seed.info.run_id, "images/ramp.png", str(tmp_path)))
    assert notes.read_text() == "seed 3" and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
