"""A sweep's trial scheduler (`sweep.scheduler`): what Ray Tune calls a `TrialScheduler`, on the driver's events.

A scheduler completes each sampled configuration (`initial`), learns of each trial as it joins (`add`),
listens to the trials' events like any listener (it may answer `PAUSE` or `STOP`, and change a paused
trial's hyperparameters and checkpoints: `TrialRunner.retarget`), and chooses which paused trial runs next
(`next_turn`). The searcher asks Optuna for trials and tells it their results; the scheduler decides what
the running trials do. Schedulers are registered by their config's `type`, beside Optuna's samplers and
pruners (`study.py`):

| `type` | scheduler |
|---|---|
| `pbt` | population-based training (`pbt.py`) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from labfleet.orchestration.events import Decision, Event

if TYPE_CHECKING:
    from labfleet.orchestration.recorder import MlflowRecorder
    from labfleet.orchestration.runner import TrialRunner
    from labfleet.spec.models import ExperimentSpec, SchedulerConfig, SweepConfig


class Scheduler(Protocol):
    def initial(self, values: dict[str, Any]) -> dict[str, Any]:
        """A trial's configuration: the sampled values, completed with what the scheduler sets itself."""
        ...

    def add(self, runner: TrialRunner, number: int, values: dict[str, Any], trial: Any = None) -> None:
        """A new trial (`number` in the study, `trial` the Optuna trial) joins with `values`."""
        ...

    def next_turn(self) -> TrialRunner | None:
        """The paused trial that runs next when a place is free, or None."""
        ...

    def handle(self, event: Event) -> Decision | None:
        """Every event of every trial of the sweep, as a listener."""
        ...


@dataclass(frozen=True)
class SchedulerContext:
    """What a scheduler is built with: the sweep, how many trials it still starts, how a configuration becomes
    a spec, where its record goes, and whom to tell of each change it makes (the sweep's table)."""

    sweep: SweepConfig
    population: int
    build_spec: Callable[[dict[str, Any]], ExperimentSpec]
    recorder: MlflowRecorder
    sweep_run: str
    on_change: Callable[[dict[str, Any]], None] | None = None


def _pbt(config: SchedulerConfig, context: SchedulerContext) -> Scheduler:
    from labfleet.orchestration.pbt import LINEAGE, PopulationBasedTraining

    lineage = context.recorder.read_json(context.sweep_run, LINEAGE) or []  # a resumed sweep's exploits so far
    scheduler = PopulationBasedTraining(config, context.sweep, context.population, context.build_spec,
                                        context.recorder, context.sweep_run, lineage)
    scheduler.on_exploit = context.on_change
    return scheduler


SCHEDULERS: dict[str, Callable[[Any, SchedulerContext], Scheduler]] = {"pbt": _pbt}


def build_scheduler(config: SchedulerConfig, context: SchedulerContext) -> Scheduler:
    return SCHEDULERS[config.type](config, context)
