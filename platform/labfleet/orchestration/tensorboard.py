"""`--tensorboard DIR`: every metric a seed run logs, also as TensorBoard event files, live.

A listener beside the MLflow recorder (it sees the same exactly-once records): one directory per seed run,
`DIR/<trial run name>/seed=<seed>/`, so `tensorboard --logdir DIR` shows each configuration's seeds side by
side and a regex over the run names groups them. A seed continued after a dead driver appends a new event file
in the same directory with the steps it had not delivered; TensorBoard reads a directory's files as one run.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from labfleet.orchestration.events import ChunkResult, Event, SeedEnded, Trial

FLUSH_SECONDS = 5  # how stale the files may be while a seed trains (TensorBoard reloads every 5 s or so)


def tensorboard_problem(directory: Path) -> str | None:
    """Why `--tensorboard DIR` cannot be used, or None: the writer is missing, or DIR is not a directory."""
    if importlib.util.find_spec("tensorboard") is None:
        return "TensorBoard event files need the tensorboard package: pip install 'labfleet[tensorboard]'"
    if directory.exists() and not directory.is_dir():
        return f"{directory} is a file; it must be a directory (one subdirectory per seed run is written into it)"
    if not directory.exists() and not directory.parent.is_dir():
        return f"no directory {directory.parent} to create {directory.name} in"
    return None


def _safe(name: str) -> str:
    """A run name as one directory name (spaces, '#' and '/' of run names become '_')."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("._") or "run"


class TensorBoardListener:
    def __init__(self, directory: Path, run_name: Any):
        """`run_name(trial)`: the trial's MLflow run name (the recorder's; it runs before this listener)."""
        self.directory = Path(directory)
        self.run_name = run_name
        self.writers: dict[tuple[Trial, int], Any] = {}

    def seed_dir(self, trial: Trial, seed: int) -> Path:
        return self.directory / _safe(self.run_name(trial)) / f"seed={seed}"

    def handle(self, event: Event) -> None:
        match event:
            case ChunkResult(trial=trial, seed=seed, records=records) if records:
                writer = self._writer(trial, seed)
                for step, values in records:
                    for name, value in values.items():
                        writer.add_scalar(name, value, step)
            case SeedEnded(trial=trial, seed=seed):
                writer = self.writers.pop((trial, seed), None)
                if writer is not None:
                    writer.close()
        return None

    def _writer(self, trial: Trial, seed: int) -> Any:
        key = (trial, seed)
        if key not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[key] = SummaryWriter(str(self.seed_dir(trial, seed)), flush_secs=FLUSH_SECONDS)
        return self.writers[key]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
