"""`labfleet run` and `labfleet suite` as real processes on a real local Ray, read back with MlflowClient."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, run_cli

SPEC = EXPERIMENTS / "cartpole_reinforce.yaml"
SMALL = ["--set", "seeds=[0,1]", "--set", "budget.env_steps=6144", "--set", "eval={episodes: 3, every_steps: 2048}",
         "--set", "hparams.n_envs=4", "--set", "hparams.n_steps=64"]


def _runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_run_two_seeds_tracked_in_mlflow(tmp_path: Path, tracking_uri: str):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli("run", str(SPEC), *SMALL, "--tracking-uri", tracking_uri, "--tensorboard",
                     str(tmp_path / "tb"), cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(cwd.iterdir()) == [], "run wrote outside the tracking location"
    tracking_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
    assert sorted(p.name for p in tracking_dir.iterdir()) == ["mlartifacts", "mlflow.db"]

    client = MlflowClient(tracking_uri)
    runs = _runs(client, "cartpole")
    trials = [r for r in runs if r.data.tags["labfleet.role"] == "trial"]
    seeds = [r for r in runs if r.data.tags["labfleet.role"] == "seed"]
    assert len(trials) == 1 and len(seeds) == 2 and len(runs) == 3
    trial = trials[0]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert "mlflow.parentRunId" not in trial.data.tags

    # the trial run carries the mean over its seeds of each evaluation step
    curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "eval/return_mean")} for r in seeds]
    means = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, "eval/return_mean")}
    assert sorted(means) == sorted(set(curves[0]) & set(curves[1]))
    assert all(means[step] == pytest.approx((curves[0][step] + curves[1][step]) / 2) for step in means)
    # --tensorboard: one directory per seed run with every metric step the seed run logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in seeds:
        tb = EventAccumulator(str(tmp_path / "tb" / "cartpole-reinforce" / f"seed={run.data.tags['labfleet.seed']}"))
        tb.Reload()
        assert set(tb.Tags()["scalars"]) == set(run.data.metrics)
        for name in run.data.metrics:
            logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            assert [(e.step, pytest.approx(e.value)) for e in tb.Scalars(name)] == sorted(logged)

    for run in seeds:
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == trial.info.run_id
        assert tags["labfleet.algorithm"] == "reinforce"
        assert tags["labfleet.env"] == "CartPole-v1"
        assert tags["labfleet.config_hash"] == trial.data.tags["labfleet.config_hash"]
        assert tags["labfleet.version"] and tags["labfleet.lib.torch"] and tags["labfleet.node"]
        assert params["hparams.n_envs"] == "4" and params["budget.env_steps"] == "6144"
        assert params["hparams.learning_rate"] == "0.001" and params["hparams.optimizer.type"] == "adam"
        assert json.loads(params["seeds"]) == [int(tags["labfleet.seed"])]
        # metric curves, x = environment steps
        evals = client.get_metric_history(run.info.run_id, "eval/return_mean")
        assert [m.step for m in evals][:2] == [2048, 4096] and len(evals) >= 3
        steps = client.get_metric_history(run.info.run_id, "time/env_steps")
        assert [m.value for m in steps] == sorted(m.value for m in steps) and steps[-1].value >= 6144
        assert client.get_metric_history(run.info.run_id, "loss/policy")
        # artifacts: the resolved spec and a checkpoint that loads safely
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"spec.yaml", "checkpoints"} <= names
        local = Path(client.download_artifacts(run.info.run_id, "spec.yaml", str(tmp_path)))
        resolved = yaml.safe_load(local.read_text())
        assert resolved["hparams"]["gamma"] == 0.99 and resolved["seeds"] == [int(tags["labfleet.seed"])]
        ckpt = Path(client.download_artifacts(run.info.run_id, "checkpoints/final.pt", str(tmp_path)))
        state = torch.load(io.BytesIO(ckpt.read_bytes()), weights_only=True)
        assert state["rl"]["env_steps"] >= 6144

    finals = [run.data.metrics["eval/return_mean"] for run in seeds]
    assert trial.data.metrics["eval/return_mean"] == pytest.approx(np.mean(finals))
    assert trial.data.metrics["eval/return_mean_std"] == pytest.approx(np.std(finals))
    assert seeds[0].data.tags["labfleet.seed"] != seeds[1].data.tags["labfleet.seed"]
    assert "labfleet results" in result.stdout and "FINISHED" in result.stdout


@pytest.mark.slow
def test_unreachable_tracking_server_is_reported_before_anything_starts(tmp_path: Path):
    result = run_cli("run", str(SPEC), "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "tracking.uri" in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_missing_tracking_directory_is_bad_input(tmp_path: Path):
    result = run_cli("run", str(SPEC), "--tracking-uri", f"sqlite:///{tmp_path}/nope/mlflow.db", cwd=tmp_path,
                     timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_trial_that_cannot_fit_the_cluster_is_bad_input(tmp_path: Path):
    store = tmp_path / "mlflow.db"
    result = run_cli("run", str(SPEC), "--set", "resources.cpus_per_trial=64", "--tracking-uri",
                     f"sqlite:///{store}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "64 CPU" in result.stderr
    assert not store.exists()


BOOM_ENV = '''
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class BoomEnv(CartPoleEnv):
    """CartPole that raises once it has been stepped 300 times."""

    steps = 0

    def step(self, action):
        BoomEnv.steps += 1
        if BoomEnv.steps > 300:
            raise RuntimeError("boom: the simulator crashed")
        return super().step(action)
'''


@pytest.mark.slow
def test_failing_trial_is_marked_failed_with_its_error(tmp_path: Path, tracking_uri: str):
    (tmp_path / "boom_env.py").write_text(BOOM_ENV)
    result = run_cli("run", str(SPEC), *SMALL, "--set", "env=boom_env:BoomEnv", "--tracking-uri", tracking_uri,
                     cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "boom: the simulator crashed" in result.stdout
    client = MlflowClient(tracking_uri)
    runs = _runs(client, "cartpole")
    seeds = [r for r in runs if r.data.tags["labfleet.role"] == "seed"]
    trial = next(r for r in runs if r.data.tags["labfleet.role"] == "trial")
    assert {r.info.status for r in seeds} == {"FAILED"}
    assert all("boom: the simulator crashed" in r.data.tags["labfleet.error"] for r in seeds)
    assert trial.info.status == "FAILED" and "boom" in trial.data.tags["labfleet.error"]


@pytest.mark.slow
def test_suite_nests_trials_under_one_suite_run(tmp_path: Path, tracking_uri: str):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "mini", "experiments": [
        {"spec": str(SPEC), "set": {"name": "reinforce-a", "seeds": [0], "budget.env_steps": 2048,
                                    "hparams.n_envs": 2, "eval.episodes": 2}},
        {"spec": str(SPEC), "set": {"name": "reinforce-b", "seeds": [1], "budget.env_steps": 2048,
                                    "hparams.n_envs": 2, "hparams.gamma": 0.9, "eval.episodes": 2}},
    ]}))
    result = run_cli("suite", str(suite), "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _runs(MlflowClient(tracking_uri), "mini")
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags["labfleet.role"], []).append(run)
    assert {k: len(v) for k, v in by_role.items()} == {"suite": 1, "trial": 2, "seed": 2}
    suite_id = by_role["suite"][0].info.run_id
    trial_ids = {r.info.run_id for r in by_role["trial"]}
    assert {r.data.tags["mlflow.parentRunId"] for r in by_role["trial"]} == {suite_id}
    assert {r.data.tags["mlflow.parentRunId"] for r in by_role["seed"]} == trial_ids
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["hparams.gamma"] for r in by_role["seed"]} == {"0.99", "0.9"}


@pytest.mark.slow
def test_ppo_with_a_rollout_worker_from_the_command_line(tmp_path: Path, tracking_uri: str):
    result = run_cli("run", str(EXPERIMENTS / "cartpole_ppo.yaml"), "--set", "seeds=[3]",
                     "--set", "budget.env_steps=4096", "--set", "resources.rollout_workers=1",
                     "--set", "eval={episodes: 3, every_steps: 2048}", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri)
    seed = next(r for r in _runs(client, "cartpole") if r.data.tags["labfleet.role"] == "seed")
    assert seed.info.status == "FINISHED" and seed.data.params["resources.rollout_workers"] == "1"
    for name in ("ppo/approx_kl", "ppo/clip_fraction", "ppo/explained_variance", "loss/value", "eval/return_mean"):
        assert client.get_metric_history(seed.info.run_id, name), name
    assert [m.step for m in client.get_metric_history(seed.info.run_id, "eval/return_mean")][0] == 2048


@pytest.mark.slow
def test_suite_runs_a_sweep_entry_and_a_rerun_skips_what_finished(tmp_path: Path, tracking_uri: str):
    vi = {"name": "vi", "algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0],
          "budget": {"iterations": 30}, "eval": {"episodes": 100, "every_steps": 10},
          "sweep": {"n_trials": 2, "sampler": {"type": "grid"}, "pruner": {"type": "nop"},
                    "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                    "space": {"hparams.gamma": {"type": "categorical", "choices": [0.5, 0.99]}}}}
    (tmp_path / "vi.yaml").write_text(yaml.safe_dump(vi))
    broken = yaml.safe_load(SPEC.read_text())
    broken.update({"name": "reinforce", "seeds": [0], "budget": {"env_steps": 2048}, "eval": {"episodes": 2}})
    broken["hparams"].update({"n_envs": 2, "learning_rate": 1e30})  # diverges: the entry FAILs
    (tmp_path / "reinforce.yaml").write_text(yaml.safe_dump(broken))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "mixed", "experiments": [
        {"spec": "vi.yaml", "set": {"name": "vi-run"}},
        {"spec": "reinforce.yaml"},
        {"spec": "vi.yaml", "sweep": True, "set": {"name": "vi-sweep"}}]}))
    first = run_cli("suite", str(suite), "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr  # the failing entry did not stop the others
    client = MlflowClient(tracking_uri)
    runs = _runs(client, "mixed")
    (suite_run,) = [r for r in runs if r.data.tags["labfleet.role"] == "suite"]
    assert suite_run.info.status == "FAILED" and "reinforce" in suite_run.data.tags["labfleet.error"]
    (sweep_run,) = [r for r in runs if r.data.tags["labfleet.role"] == "sweep"]
    assert sweep_run.data.tags["mlflow.parentRunId"] == suite_run.info.run_id
    sweep_trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(sweep_trials) == 2 and {r.info.status for r in sweep_trials} == {"FINISHED"}

    broken["hparams"]["learning_rate"] = 1e-3  # fix the failing entry, run the same suite again
    (tmp_path / "reinforce.yaml").write_text(yaml.safe_dump(broken))
    second = run_cli("suite", str(suite), "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "vi-run: finished in the interrupted run of this suite, skipped" in second.stdout
    runs = _runs(client, "mixed")
    suites = [r for r in runs if r.data.tags["labfleet.role"] == "suite"]
    assert len(suites) == 1 and suites[0].info.status == "FINISHED", "the same suite run resumed"
    trials = [r for r in runs if r.data.tags["labfleet.role"] == "trial"
              and r.data.tags["mlflow.parentRunId"] == suites[0].info.run_id]
    names = sorted((r.data.tags["mlflow.runName"], r.info.status) for r in trials)
    # the rerun's trial is told apart from the failed one by its name (issue 17), its label is the same
    assert names == [("reinforce", "FAILED"), ("reinforce #2", "FINISHED"), ("vi-run", "FINISHED")]
    assert {r.data.tags["labfleet.label"] for r in trials} == {"reinforce", "vi-run"}
    study = optuna.load_study(study_name="vi-sweep", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2, "the sweep's finished study was resumed, not run again"


@pytest.mark.slow
def test_seeds_sharing_actors_keep_their_own_runs(tmp_path: Path, tracking_uri: str):
    """`resources.seeds_per_actor: 2` with three seeds: two actors (seeds 0 and 1 together, seed 2 alone);
    every seed still has its own run, curves, final evaluation and checkpoint."""
    result = run_cli("run", str(EXPERIMENTS / "cartpole_ppo.yaml"), "--set", "seeds=[0,1,2]",
                     "--set", "budget.env_steps=4096", "--set", "resources.seeds_per_actor=2",
                     "--set", "eval={episodes: 2, every_steps: 2048}", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri)
    runs = _runs(client, "cartpole")
    seeds = {int(r.data.tags["labfleet.seed"]): r for r in runs if r.data.tags["labfleet.role"] == "seed"}
    assert sorted(seeds) == [0, 1, 2] and {r.info.status for r in runs} == {"FINISHED"}
    pids = {seed: run.data.tags["labfleet.pid"] for seed, run in seeds.items()}
    assert pids[0] == pids[1] != pids[2], pids
    for seed, run in seeds.items():
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")] == [2048, 4096]
        ckpt = Path(client.download_artifacts(run.info.run_id, "checkpoints/final.pt", str(tmp_path)))
        state = torch.load(io.BytesIO(ckpt.read_bytes()), weights_only=True)
        assert state["rl"]["env_steps"] == 4096 and state["optimizer"]["updates"] > 0, seed
    finals = [run.data.metrics["eval/return_mean"] for run in seeds.values()]
    assert len(set(finals)) > 1, "three seeds, three different policies"


def test_tensorboard_into_a_file_is_refused_before_anything_starts(tmp_path: Path, tracking_uri: str):
    (tmp_path / "tb").write_text("not a directory")
    result = run_cli("run", str(SPEC), *SMALL, "--tracking-uri", tracking_uri, "--tensorboard", str(tmp_path / "tb"),
                     cwd=tmp_path)
    assert result.returncode == 2 and "--tensorboard" in result.stderr and "is a file" in result.stderr
    assert MlflowClient(tracking_uri).get_experiment_by_name("cartpole") is None  # nothing was written
