"""What a trial actor sends the driver: frozen, picklable dataclasses that travel through Ray (`trial.py`
makes them, `runner.py` reads them). Nothing here touches a trainer, a store or Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

Record = tuple[int, dict[str, float]]  # (metric step, {metric name: value})


@dataclass(frozen=True)
class SeedChunk:
    """One seed's chunk of training: its new metric records, where it stands, and what it brings back."""

    records: list[Record]
    progress: int  # budget units done
    done: bool
    checkpoint: bytes | None = None  # at the end of a chunk that evaluated, and at the end
    final: dict[str, float] | None = None  # the final evaluation, once done
    artifacts: dict[str, bytes] = field(default_factory=dict)  # images, videos
    resumed: str | None = None  # "exact" or "approximate": how its last load from a checkpoint went, once
    busy_s: float = 0.0  # seconds the chunk trained


@dataclass(frozen=True)
class SeedFailed:
    """A member of a group whose trainer could not be built or restored, raised, or produced a non-finite
    metric: it fails alone."""

    error: str


@dataclass(frozen=True)
class GroupChunk:
    """One call of a group actor: each member's chunk or failure, by the member's key."""

    seeds: dict[int, SeedChunk | SeedFailed]
