"""A store on a disk that fills up: at creation (MLflow's migrations fail) the command is refused with one
line, and mid-run (a checkpoint no longer fits) the runs end FAILED with the error instead of a progress
display that says FINISHED over a store left RUNNING. The disk is a small tmpfs (this needs root, as CI has)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, run_cli


# The store on the small disk is made by MLflow's own migrations, not copied from labfleet's template
# (tracking/template.py): the migrations leave the store's write-ahead log a few MB long, room that later
# writes to the store reuse, so that it is a checkpoint's write that meets the full disk, as these tests
# intend. (A copied store has no such room; where the store itself fills up, the runs it can no longer
# write stay RUNNING for `labfleet reconcile`.) A file where the cache directory would be turns it off.
def _no_template(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "no-cache").write_text("")
    return {"LABFLEET_CACHE_DIR": str(tmp_path / "no-cache" / "labfleet")}


@pytest.fixture()
def small_disk(tmp_path: Path, request) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    size = request.param
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs to mount a tmpfs (root): {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["5M"], indirect=True)
def test_a_disk_that_fills_mid_run_ends_the_runs_failed(small_disk: Path, tmp_path: Path):
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    result = run_cli("run", str(EXPERIMENTS / "cartpole_reinforce.yaml"), "--set", "seeds=[0]", "--set",
                     "budget.env_steps=200000", "--tracking-uri", uri, "--quiet", cwd=tmp_path,
                     env=_no_template(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and "No space left on device" in out, out
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and {r.info.status for r in runs} == {"FAILED"}, [(r.data.tags["labfleet.role"], r.info.status)
                                                                    for r in runs]
    assert all("No space left on device" in r.data.tags["labfleet.error"] for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["3M"], indirect=True)
def test_a_store_that_cannot_be_created_on_a_full_disk_is_refused_in_a_line(small_disk: Path, tmp_path: Path):
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    for attempt in range(2):  # the second finds the store the first left half-made
        result = run_cli("run", str(EXPERIMENTS / "cartpole_reinforce.yaml"), "--tracking-uri", uri, "--quiet",
                         cwd=tmp_path, env=_no_template(tmp_path))
        out = result.stdout + result.stderr
        assert result.returncode == 2, out
        assert "Traceback" not in out and "tracking.uri" in out, out
        assert ("disk is full" in out) if attempt == 0 else ("half-made" in out or "not a whole" in out), out
