"""The actor pool in a sweep of short trials: an idle actor goes to the next trial, and a seed whose
reservation Ray has made keeps its own actor."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from labfleet.orchestration.commands import execute_sweep
from labfleet.spec.loading import resolve_spec_data

SWEEP = {
    "name": "pool", "algorithm": "value_iteration", "env": "FrozenLake-v1", "seeds": [0],
    "budget": {"iterations": 5}, "eval": {"episodes": 10, "every_steps": 5}, "resources": {"cpus_per_trial": 1},
    "tracking": {"experiment": "pool"},
    "sweep": {"metric": "eval/return_mean", "direction": "maximize", "n_trials": 40, "max_parallel": 2,
              "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "nop"},
              "space": {"hparams.gamma": {"type": "float", "low": 0.5, "high": 0.999}}},
}


@pytest.mark.slow
def test_short_trials_start_no_actor_after_the_first_two(ray_local, tracking_uri: str, tmp_path: Path):
    """Two trials at a time on a cluster of two CPUs: two placement groups (and actors) for 40 trials.
    A seed whose reservation Ray had made was once read as unplaced when the GCS answered later than a
    1 ms wait (a loaded machine, or a driver busy with its store); it then took the idle actor of a
    finished trial and killed its own, already starting one, and the next trial found no idle actor and
    started another: 3 to 15 placement groups for 64 trials in the overhead benchmark."""
    from ray.util import placement_group_table

    before = set(placement_group_table())
    spec = resolve_spec_data(SWEEP, "<test>", check_env=False)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with open(os.devnull, "w") as devnull:
        code = execute_sweep(SWEEP, spec, tmp_path / "pool.yaml", storage=storage, n_trials=None,
                             cli_tracking_uri=tracking_uri, address=None, console=Console(file=devnull),
                             quiet=True).code
    assert code == 0
    study = optuna.load_study(study_name="pool", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 40
    created = set(placement_group_table()) - before
    assert len(created) == 2, f"{len(created)} placement groups for 40 trials"
