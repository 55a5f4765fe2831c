"""What the driver core says happened, and what listeners may answer.

`TrialRunner` (runner.py) keeps only the execution side of a trial: its seeds, their units (actors, placement
groups, retries), the actor pool. Everything else listens to the events it emits, in the order the listeners
were given:
- `MlflowRecorder` (recorder.py) writes the run hierarchy;
- `TensorBoardListener` (tensorboard.py), with `--tensorboard DIR`, writes the same records as event files;
- `ProgressListener` (progress.py) draws the bars;
- `OptunaSearcher` (searcher.py) reports to the pruner and tells the study;
- schedulers (pbt.py) decide whether a trial goes on, waits, or takes another trial's checkpoint.

A listener's `handle` returns None, or a `Decision` for the trial that the event is about (only
`ChunkResult` and `Evaluation` events take decisions). Events are frozen dataclasses: a listener must not
change what the next listener sees. Listeners are tested on events alone, without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from labfleet.algorithms.info import AlgorithmInfo
    from labfleet.spec.models import ExperimentSpec


class Status(StrEnum):
    """The state of a seed or a trial (a `str`: MLflow's run statuses are these words)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"

    @property
    def ended(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.KILLED)


class Action(Enum):
    CONTINUE = "continue"
    STOP = "stop"  # end the trial now: its seeds and the trial end as `Decision.status`
    PAUSE = "pause"  # hold the seed until a scheduler resumes it (PBT's perturbation points)


@dataclass(frozen=True)
class Decision:
    action: Action
    status: Status = Status.FINISHED  # STOP: the end state (a pruned trial ends FINISHED)
    reason: str = ""


CONTINUE = Decision(Action.CONTINUE)
DRIVER_ERROR = "driver error"  # the reason of a stop when the driver itself fails


@dataclass(frozen=True)
class SeedRecord:
    """What a tracking store knows of a seed that an earlier driver started (see `TrialRunner.resume`)."""

    status: Status
    checkpoint: bytes | None = None
    logged: dict[str, int] = field(default_factory=dict)  # metric -> the last step in its history
    final: dict[str, float] = field(default_factory=dict)  # the latest eval/* values
    retries: int = 0
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # metric step -> the eval/* values logged


@dataclass
class TrialMeta:
    """What the record of a trial says about it besides its spec (read by the recorder, not the runner)."""

    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # a sweep's sampled values, else the whole spec
    spec_dir: str = "."  # for the git commit of the code that ran


class Trial(Protocol):
    """What a listener may read of the trial an event is about (a `TrialRunner`; listeners keep their own
    state per trial, keyed by it)."""

    spec: ExperimentSpec
    info: AlgorithmInfo
    experiment: str  # the MLflow experiment
    label: str  # its name in the bars and the record
    meta: TrialMeta


# --- events ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialStarted:
    trial: Trial
    resumed: bool = False  # continuing what an earlier driver left (its records were given to `resume`)


@dataclass(frozen=True)
class SeedStarted:
    """A seed joins the trial: its first launch, or (with `record`) a seed an earlier driver left unfinished."""

    trial: Trial
    seed: int
    total: int
    record: SeedRecord | None = None


@dataclass(frozen=True)
class SeedRestored:
    """A seed that an earlier driver finished: it stays finished."""

    trial: Trial
    seed: int
    record: SeedRecord


@dataclass(frozen=True)
class SeedPlaced:
    """The seed's actor runs here (after every launch: a retried seed may move to another node)."""

    trial: Trial
    seed: int
    where: dict[str, str]


@dataclass(frozen=True)
class SeedRetried:
    trial: Trial
    seed: int
    retries: int
    error: str


@dataclass(frozen=True)
class ChunkResult:
    """One chunk of training came back. `records` hold only steps not delivered before (exactly once);
    `checkpoint` is a new checkpoint to keep durable (None when the chunk made none, or ended the seed)."""

    trial: Trial
    seed: int
    records: list[tuple[int, dict[str, float]]]
    artifacts: dict[str, bytes]
    progress: int
    checkpoint: bytes | None
    done: bool
    latest: dict[str, float]  # the seed's latest value of every metric, this chunk's included
    resumed: str | None = None  # the chunk's actor started from a checkpoint: "exact" or "approximate"


@dataclass(frozen=True)
class Evaluation:
    """A new evaluation step of one seed (`values`: its eval/* metrics), in step order."""

    trial: Trial
    seed: int
    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class SeedPaused:
    """A seed holds (a listener answered PAUSE) until `TrialRunner.resume_seed` or `suspend`/`unsuspend`."""

    trial: Trial
    seed: int
    progress: int


@dataclass(frozen=True)
class SeedEnded:
    trial: Trial
    seed: int
    status: Status
    final: dict[str, float] | None = None
    checkpoint: bytes | None = None  # the last checkpoint (the final one, for a finished seed)
    error: str | None = None


@dataclass(frozen=True)
class TrialEnded:
    """Every seed has ended. `metrics`: the mean and std over the finished seeds of each final eval/*
    value, at `step` (ARCHITECTURE section 6). `reason`: why a scheduler stopped it (e.g. "pruned").
    `finals` and `errors`: each seed's final eval/* values (None without a final evaluation) and each
    failed seed's error, for listeners that judge the trial by its seeds (a sweep's objective)."""

    trial: Trial
    status: Status
    metrics: dict[str, float]
    step: int
    error: str | None = None
    reason: str = ""
    finals: dict[int, dict[str, float] | None] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


Event = (TrialStarted | SeedStarted | SeedRestored | SeedPlaced | SeedRetried | ChunkResult | Evaluation
         | SeedPaused | SeedEnded | TrialEnded)


class Listener(Protocol):
    def handle(self, event: Event) -> Decision | None: ...
