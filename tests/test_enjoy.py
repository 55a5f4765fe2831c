"""Watching the agent (issue 17): `labfleet enjoy` replays a seed run's final policy and records MP4s that
it logs to the run; `labfleet.load` gives the trainer back; a generative model gives a sample grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import labfleet
from tests.conftest import EXPERIMENTS, run_cli


@pytest.mark.slow
def test_eval_video_enjoy_and_load_give_the_trainer_back(tmp_path: Path, tracking_uri: str):
    """One training run (a whole command costs about 10 s) serves the three: the final evaluation's video
    recorded during training, `labfleet enjoy --video` on the finished run, and `labfleet.load`."""
    trained = run_cli("run", str(EXPERIMENTS / "cartpole_ppo.yaml"), "--set", "seeds=[0]", "--set",
                      "budget.env_steps=4096", "--set", "eval={episodes: 2, video: true}", "--tracking-uri",
                      tracking_uri, "--quiet", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    client = MlflowClient(tracking_uri)
    (seed,) = client.search_runs([client.get_experiment_by_name("cartpole").experiment_id],
                                 "tags.`labfleet.role` = 'seed'")
    (video,) = client.list_artifacts(seed.info.run_id, "videos")
    assert video.path == "videos/final.mp4" and video.file_size > 1000

    result = run_cli("enjoy", "cartpole", "--episodes", "2", "--video", "--out", str(tmp_path / "out"),
                     "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cartpole-ppo/seed=0: returns " in result.stdout
    videos = sorted((tmp_path / "out").rglob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 1000 for v in videos)
    assert videos[0].read_bytes()[4:8] == b"ftyp"  # an MP4 container
    logged = {a.path for a in client.list_artifacts(seed.info.run_id, "videos")}
    assert len(logged) == 3 and "videos/final.mp4" in logged, "enjoy's two videos beside training's own"

    trainer = labfleet.load(seed.info.run_id, tracking_uri)
    assert type(trainer).__name__ == "PPOTrainer" and trainer.progress >= 4096
    assert labfleet.load("cartpole", tracking_uri).progress == trainer.progress  # by experiment: the same seed
    actions = trainer.greedy_actions(np.zeros((3, 4), dtype=np.float32))
    assert actions.shape == (3,) and set(actions) <= {0, 1}


@pytest.mark.slow
def test_eval_video_is_refused_without_an_environment(tmp_path: Path):
    refused = run_cli("validate", str(EXPERIMENTS / "digits_vae.yaml"), "--set", "eval.video=true", cwd=tmp_path)
    assert refused.returncode == 2 and "eval.video: vae has no environment to record" in refused.stderr


@pytest.mark.slow
def test_enjoy_a_generative_model_writes_a_sample_grid(tmp_path: Path, tracking_uri: str):
    trained = run_cli("run", str(EXPERIMENTS / "digits_vae.yaml"), "--set", "seeds=[0]", "--set",
                      "budget={epochs: 1}", "--tracking-uri", tracking_uri, "--quiet", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    result = run_cli("enjoy", "digits", "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    pngs = list((tmp_path / "out").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.slow
def test_enjoy_refuses_what_is_not_there(tmp_path: Path, tracking_uri: str):
    result = run_cli("enjoy", "nope", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert result.returncode == 2 and "no MLflow store" in result.stderr
