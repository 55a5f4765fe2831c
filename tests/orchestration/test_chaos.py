"""The short chaos soak (issue 14 section 5; the long one is `python benchmarks/chaos.py`): on a two-node local
cluster, a PPO trial with a rollout worker, a DQN trial and a data-parallel VAE trial run while a seeded
killer SIGKILLs a trial actor, a rollout worker and a data-parallel rank. Every seed finishes with the
final evaluation and checkpoint of an undisturbed run of the same suite, bit for bit; no metric history
repeats a step; nothing stays RUNNING; the retries are recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_suite_under_kills_ends_as_an_undisturbed_run():
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "benchmarks/chaos.py", "--short", "--every", "8", "15", "--kills", "3",
                             "--no-node-kill", "--seed", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["chaos_exit"] == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not summary["problems"], summary["problems"]
    assert summary["seeds"] == summary["equal_to_reference"] == 3
    assert summary["duplicate_histories"] == 0 and summary["left_running"] == 0
    assert len(summary["kills"]) >= 2 and summary["retries"] >= 1, summary  # (a kill can hit an idle pooled actor)
    assert set(summary["resume_tags"].values()) <= {"exact", "-"}, summary["resume_tags"]
