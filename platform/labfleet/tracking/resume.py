"""What a rerun of a command needs from the tracking store to continue the work of a driver that died:
the trial run it left unfinished, and for each seed its state, last checkpoint and logged steps.

A seed's latest checkpoint is an artifact of its run (`checkpoints/latest.pt`, rewritten at every
checkpoint), so it survives the driver without any shared filesystem, as the runs themselves do.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from labfleet import metrics as M

LATEST_CHECKPOINT = "checkpoints/latest.pt"
LABEL_TAG = "labfleet.label"  # a trial run's configuration label (its run name may add " #N" on reruns)
UNFINISHED = ("RUNNING", "KILLED")  # a driver that died, or was interrupted; FAILED trials start anew


@dataclass
class SeedRecord:
    run_id: str
    status: str
    checkpoint: bytes | None = None
    logged: dict[str, int] = field(default_factory=dict)  # metric -> the last step in its history
    final: dict[str, float] = field(default_factory=dict)  # the latest eval/* values
    retries: int = 0


def find_unfinished_trial(client: Any, experiment_id: str, name: str, config_hash: str, seeds: list[int],
                          parent: str | None) -> Any | None:
    """The latest trial run of this configuration (same label, config hash, seeds and parent) that a
    driver left RUNNING or KILLED, or None. A FINISHED one is never reopened."""
    query = (f"tags.`labfleet.role` = 'trial' and tags.`labfleet.config_hash` = '{config_hash}' "
             f"and tags.`{LABEL_TAG}` = '{name}'")
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=20):
        if run.data.tags.get("mlflow.parentRunId") != parent or run.data.params.get("seeds") != json.dumps(seeds):
            continue
        return run if run.info.status in UNFINISHED else None  # only the latest such run counts
    return None


def seed_records(client: Any, experiment_id: str, trial_run_id: str) -> dict[int, SeedRecord]:
    """{seed: its record} for the seed runs under a trial run."""
    records = {}
    for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{trial_run_id}'", max_results=1000):
        if run.data.tags.get("labfleet.role") != "seed":
            continue
        run_id = run.info.run_id
        record = SeedRecord(run_id, run.info.status, retries=int(run.data.tags.get("labfleet.retries", 0)))
        if run.info.status == "FINISHED":
            record.final = {k: v for k, v in run.data.metrics.items() if k.startswith(M.EVAL_PREFIX)}
        else:
            record.checkpoint = _download(client, run_id, LATEST_CHECKPOINT)
            for key in run.data.metrics:
                record.logged[key] = max(m.step for m in client.get_metric_history(run_id, key))
        records[int(run.data.tags["labfleet.seed"])] = record
    return records


def _download(client: Any, run_id: str, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="labfleet-resume-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):  # no checkpoint yet: the seed starts from scratch
            return None
        return Path(local).read_bytes()
