"""Population-based training (`sweep.scheduler: {type: pbt, ...}`), a scheduler on the driver's events.

Jaderberg et al. 2017, with the semantics of Ray Tune's `PopulationBasedTraining`: the sweep's `n_trials`
trials are the population. A trial's seeds pause (`PAUSE`) when they reach its next perturbation point
(every `perturbation_interval` budget units); once all have, the trial is ranked among the members by
their scores (each one's latest evaluation of `sweep.metric` that all its seeds reached, mean over
seeds). In the bottom `quantile_fraction` it takes the checkpoints of a random top-quantile member
(exploit) and that member's hyperparameters, each mutable one perturbed (x0.8 or x1.2, clipped to its space) or, with
`resample_probability`, resampled (explore); it then trains on from there (`TrialRunner.retarget`).

The checkpoints pass through the driver (they are the bytes the donor's last chunk returned), so no
shared filesystem is needed. With more members than `sweep.max_parallel`, a trial at a perturbation point
waits its turn (`TrialRunner.suspend`: its actors are freed) while a member behind it (not started yet,
or suspended with less progress) runs; members run in order of least progress.

The record: every exploit goes on the sweep run as `pbt_lineage.json` (step, from trial, to trial, their
scores, old and new values), rewritten at each one; each trial run logs its schedule as metrics
`pbt/<name>` (the value of each mutable hyperparameter from each step on), and the Optuna trial's user
attribute `pbt.config` holds its current values.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labfleet.orchestration.events import (
    Action,
    ChunkResult,
    Decision,
    Evaluation,
    Event,
    SeedPaused,
    Status,
    Trial,
    TrialEnded,
    TrialStarted,
)
from labfleet.orchestration.recorder import MlflowRecorder
from labfleet.orchestration.runner import TrialRunner
from labfleet.spec.models import ExperimentSpec, ParamSpace, PBTConfig, SweepConfig
from labfleet.tracking.runs import PBT_LINEAGE

LINEAGE = PBT_LINEAGE
PAUSE = Decision(Action.PAUSE, reason="perturbation point")


def schedule_metric(path: str) -> str:
    return "pbt/" + path.removeprefix("hparams.")


def sample(space: ParamSpace, rng: random.Random) -> Any:
    """A value drawn from the space (uniform, or log-uniform; on its step grid)."""
    if space.type == "categorical":
        return rng.choice(space.choices or [])
    assert space.low is not None and space.high is not None
    if space.log:
        value = math.exp(rng.uniform(math.log(space.low), math.log(space.high)))
    else:
        value = rng.uniform(space.low, space.high)
    return _fit(value, space)


def explore(value: Any, space: ParamSpace, config: PBTConfig, rng: random.Random) -> Any:
    """Tune's explore: resample with `resample_probability`, else perturb (a numeric value times one of
    `perturbation_factors`, clipped to the space; a categorical one moves to a neighbouring choice)."""
    if rng.random() < config.resample_probability:
        return sample(space, rng)
    if space.type == "categorical":
        choices = space.choices or []
        index = choices.index(value) if value in choices else rng.randrange(len(choices))
        return choices[min(max(index + rng.choice((-1, 1)), 0), len(choices) - 1)]
    return _fit(float(value) * rng.choice(config.perturbation_factors), space)


def _fit(value: float, space: ParamSpace) -> Any:
    assert space.low is not None and space.high is not None
    value = min(max(value, space.low), space.high)
    if space.step is not None:
        value = space.low + round((value - space.low) / space.step) * space.step
        value = min(value, space.high)
    if space.type == "int":
        return int(min(max(round(value), math.ceil(space.low)), math.floor(space.high)))
    return float(value)


@dataclass
class Member:
    number: int
    runner: TrialRunner
    values: dict[str, Any]  # every path the trial sets: the sampled space and the mutable hyperparameters
    next_point: int
    trial: Any = None  # the Optuna trial (its `pbt.config` user attribute)
    score: float | None = None
    paused: set[int] = field(default_factory=set)
    ended: bool = False

    @property
    def progress(self) -> int:
        return min((s.progress for s in self.runner.seeds.values()), default=0)


class PopulationBasedTraining:
    def __init__(self, config: PBTConfig, sweep: SweepConfig, population: int,
                 build_spec: Callable[[dict[str, Any]], ExperimentSpec], recorder: MlflowRecorder, sweep_run: str,
                 lineage: list[dict[str, Any]] | None = None):
        self.config, self.sweep, self.population = config, sweep, population
        self.build_spec, self.recorder, self.sweep_run = build_spec, recorder, sweep_run
        self.rng = random.Random(config.seed)
        self.sign = 1.0 if sweep.direction == "maximize" else -1.0
        self.members: dict[Trial, Member] = {}  # by runner
        self.waiting: list[Member] = []  # suspended at a perturbation point, waiting for their turn
        self.lineage: list[dict[str, Any]] = list(lineage or [])
        self.on_exploit: Callable[[dict[str, Any]], None] | None = None  # told each lineage entry (the display)

    # --- the population -------------------------------------------------------------------------
    def initial(self, values: dict[str, Any]) -> dict[str, Any]:
        """The sampled values, with every mutable hyperparameter the space does not set drawn from its
        mutation space (as Tune fills a config from `hyperparam_mutations`)."""
        extra = {path: sample(space, self.rng) for path, space in self.config.mutations.items() if path not in values}
        return {**values, **extra}

    def add(self, runner: TrialRunner, number: int, values: dict[str, Any], trial: Any = None) -> None:
        self.members[runner] = Member(number, runner, dict(values), self.config.perturbation_interval, trial)
        if trial is not None:
            trial.set_user_attr("pbt.config", self._mutable(values))

    def next_turn(self) -> TrialRunner | None:
        """The waiting member with the least progress (it runs next), or None."""
        self.waiting = [m for m in self.waiting if not m.ended]
        if not self.waiting:
            return None
        member = min(self.waiting, key=lambda m: m.progress)
        self.waiting.remove(member)
        return member.runner

    def _unstarted(self) -> int:
        return max(0, self.population - len(self.members))

    def _mutable(self, values: dict[str, Any]) -> dict[str, Any]:
        return {path: values[path] for path in self.config.mutations if path in values}

    # --- events ---------------------------------------------------------------------------------
    def handle(self, event: Event) -> Decision | None:
        member = self.members.get(event.trial)
        if member is None:
            return None
        match event:
            case TrialStarted():
                self._log_schedule(member, 0)
            case Evaluation():  # the member's score: its latest evaluation that every seed has reached
                means = member.runner.eval_means(self.sweep.metric)
                if means:
                    member.score = means[max(means)]
            case ChunkResult(progress=progress, done=done) if not done and progress >= member.next_point:
                return PAUSE
            case SeedPaused(seed=seed):
                member.paused.add(seed)
                running = {s.seed for s in member.runner.seeds.values() if s.status == Status.RUNNING}
                if running <= member.paused:
                    self._perturbation_point(member)
            case TrialEnded():
                member.ended = True
        return None

    def _perturbation_point(self, member: Member) -> None:
        runner = member.runner
        member.paused.clear()
        progress = member.progress
        while member.next_point <= progress:
            member.next_point += self.config.perturbation_interval
        self._exploit(member, progress)
        behind = self._unstarted() > 0 or any(m.progress < progress for m in self.waiting if not m.ended)
        if behind:
            runner.suspend()
            self.waiting.append(member)
        else:
            for state in list(runner.seeds.values()):
                if state.paused:
                    runner.resume_seed(state.seed)

    def _exploit(self, member: Member, step: int) -> None:
        ranked = sorted((m for m in self.members.values() if m.score is not None and not
                         (m.ended and m.runner.status != Status.FINISHED)),
                        key=lambda m: self.sign * (m.score or 0.0), reverse=True)
        if len(ranked) < 2 or member not in ranked:
            return
        size = min(max(1, math.ceil(len(ranked) * self.config.quantile_fraction)), len(ranked) // 2)
        top, bottom = ranked[:size], ranked[-size:]
        if member not in bottom:
            return
        donor = self.rng.choice(top)
        checkpoints = {seed: state.checkpoint for seed, state in donor.runner.seeds.items()
                       if state.checkpoint is not None}
        if set(checkpoints) != set(member.runner.seeds):
            return  # the donor has no checkpoint of every seed yet
        old = self._mutable(member.values)
        new = {path: explore(donor.values.get(path, old.get(path)), space, self.config, self.rng)
               for path, space in self.config.mutations.items()}
        values = {**donor.values, **new}
        member.runner.retarget(self.build_spec(values), checkpoints)
        member.values = values
        self.lineage.append({"step": step, "from_trial": donor.number, "to_trial": member.number,
                             "from_score": donor.score, "to_score": member.score, "old": old, "new": new})
        self.recorder.run_artifact(self.sweep_run, LINEAGE, json.dumps(self.lineage, indent=2).encode())
        if self.on_exploit is not None:
            self.on_exploit(self.lineage[-1])
        if member.trial is not None:
            member.trial.set_user_attr("pbt.config", new)
        self._log_schedule(member, step)

    def _log_schedule(self, member: Member, step: int) -> None:
        numeric = {schedule_metric(path): float(value) for path, value in self._mutable(member.values).items()
                   if isinstance(value, int | float) and not isinstance(value, bool)}
        if numeric:
            self.recorder.trial_metrics(member.runner, numeric, step, now=True)
