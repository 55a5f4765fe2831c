"""A sweep's study, built from its spec: the sampler, the pruner, the grid, the suggestions, and every
check of the `sweep:` section that runs before anything starts (`check_sweep`)."""

from __future__ import annotations

import math
import os
from typing import Any

import optuna

from labfleet.errors import Problem, SpecError
from labfleet.spec.loading import apply_overrides, resolve_spec_data
from labfleet.spec.models import ExperimentSpec, ParamSpace, SweepConfig
from labfleet.tracking.studies import DEFAULT_STORAGE, build_storage, storage_problem
from labfleet.tracking.uri import redact_uri

if not os.environ.get("LABFLEET_VERBOSE"):  # "A new study created ..." and the like: see `labfleet --verbose`
    optuna.logging.set_verbosity(optuna.logging.WARNING)
TrialState = optuna.trial.TrialState


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for ask/tell: its `after_trial` only calls `study.stop()`, which works inside
    `study.optimize` alone; the driver asks `is_exhausted` itself instead."""

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        return None


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler, "grid": AskTellGridSampler,
}
PRUNERS = {
    "nop": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
}


def grid_values(path: str, p: ParamSpace) -> list[Any]:
    if p.type == "categorical":
        return list(p.choices or [])
    if p.step is None:
        raise ValueError(f"the grid sampler needs `choices` or a `step` for {path}")
    assert p.low is not None and p.high is not None
    count = int(round((p.high - p.low) / p.step)) + 1
    values = [p.low + i * p.step for i in range(count)]
    return [int(v) for v in values] if p.type == "int" else values


def build_sampler(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    kwargs = dict(sweep.sampler.model_extra or {})
    if sweep.sampler.seed is not None:
        kwargs["seed"] = sweep.sampler.seed
    if sweep.sampler.type == "tpe" and sweep.max_parallel > 1:
        kwargs.setdefault("constant_liar", True)  # parallel trials should not all sample the same point
    if sweep.sampler.type == "grid":
        kwargs["search_space"] = {path: grid_values(path, p) for path, p in sweep.space.items()}
    return SAMPLERS[sweep.sampler.type](**kwargs)


def build_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    return PRUNERS[sweep.pruner.type](**dict(sweep.pruner.model_extra or {}))


def suggest(trial: optuna.Trial, path: str, p: ParamSpace) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(path, p.choices or [])
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)


def check_sweep(data: dict[str, Any], spec: ExperimentSpec, source: str, storage: str | None = None) -> SweepConfig:
    """The sweep section's own problems: missing, the storage URL, sampler/pruner arguments, and every
    searched path with its extreme values applied to the spec."""
    if spec.sweep is None:
        raise SpecError([Problem(source, "sweep", "labfleet sweep needs a `sweep:` section (see the README)")])
    sweep = spec.sweep
    problems: list[Problem] = []
    url = storage or sweep.storage or DEFAULT_STORAGE
    if (reason := storage_problem(url)) is not None:
        problems.append(Problem(source, "--storage" if storage else "sweep.storage", f"{redact_uri(url)}: {reason}"))
    if not sweep.space and sweep.scheduler is None:
        problems.append(Problem(source, "sweep.space", "name at least one path to search"))
    for name, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        try:
            build(sweep)
        except (TypeError, ValueError, ImportError) as exc:
            problems.append(Problem(source, f"sweep.{name}", f"{type(exc).__name__}: {exc}"))
    problems += _objective_problems(sweep, spec, source)
    problems += _scheduler_problems(data, sweep, spec, source)
    problems += _share_problems(sweep, spec, source)
    for path, p in sweep.space.items():
        for value in _probe_values(p):
            try:
                resolve_spec_data(apply_overrides(data, {path: value}), source, check_env=False)
            except SpecError as exc:
                problems.extend(Problem(source, f"sweep.space.{path}", f"with {value!r}: {q.path}: {q.message}")
                                for q in exc.problems)
    if problems:
        raise SpecError(problems)
    return sweep


def _probe_values(p: ParamSpace) -> list[Any]:
    """The values of a space that validation applies to the spec: every choice, or both ends and, for a
    float space, a point inside (a float range over an int field fails there, not at its integral ends)."""
    if p.type == "categorical":
        return list(p.choices or [])
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return [int(p.low), int(p.high)]
    inside = math.sqrt(p.low * p.high) if p.log else p.low + 0.371 * (p.high - p.low)
    if p.step is not None:
        inside = p.low + round((inside - p.low) / p.step) * p.step
    return [p.low, p.high] + ([inside] if p.low < inside < p.high else [])


def _scheduler_problems(data: dict[str, Any], sweep: SweepConfig, spec: ExperimentSpec, source: str) -> list[Problem]:
    """PBT mutates only what the algorithm honours mid-training, ranks on one objective, and perturbs
    inside the budget; every mutation space's values are applied to the spec as the search space's are."""
    from labfleet.algorithms import registry

    pbt = sweep.scheduler
    if pbt is None:
        return []
    problems = []
    if spec.resources.seeds_per_actor > 1:
        problems.append(Problem(source, "resources.seeds_per_actor", "population-based training pauses and "
                                "retargets each seed on its own: use 1 with sweep.scheduler"))
    if sweep.multi_objective:
        problems.append(Problem(source, "sweep.scheduler", "population-based training ranks trials on one metric; "
                                "use `sweep.metric`, not `sweep.metrics`"))
    if pbt.perturbation_interval >= spec.budget.total:
        problems.append(Problem(source, "sweep.scheduler.perturbation_interval",
                                f"{pbt.perturbation_interval} is not below the budget ({spec.budget.total}): no "
                                f"trial would ever reach a perturbation point"))
    info = registry.get(spec.algorithm)
    allowed = ", ".join(f"hparams.{name}" for name in info.mutable_hparams) or "none"
    for path, space in pbt.mutations.items():
        field = f"sweep.scheduler.mutations.{path}"
        if path.removeprefix("hparams.") not in info.mutable_hparams or not path.startswith("hparams."):
            problems.append(Problem(source, field, f"{spec.algorithm} cannot change this mid-training; "
                                    f"population-based training may mutate: {allowed}"))
            continue
        for value in _probe_values(space):
            try:
                resolve_spec_data(apply_overrides(data, {path: value}), source, check_env=False)
            except SpecError as exc:
                problems.extend(Problem(source, field, f"with {value!r}: {q.path}: {q.message}")
                                for q in exc.problems)
    return problems


def _share_problems(sweep: SweepConfig, spec: ExperimentSpec, source: str) -> list[Problem]:
    """Trials share an actor only where their batched group takes each member's values of every searched
    path (nothing that changes a network's shape, a rollout's or a minibatch's)."""
    from labfleet.algorithms.seedgroup import per_seed_hparams

    if not sweep.share_actors:
        return []
    problems = []
    if spec.resources.seeds_per_actor < 2:
        problems.append(Problem(source, "resources.seeds_per_actor", "sweep.share_actors packs the seeds of "
                                "several trials into one actor of up to this many seeds: set it to 2 or more"))
    if spec.resources.rollout_workers:
        problems.append(Problem(source, "resources.rollout_workers", "trials that share an actor train batched "
                                "in its one process: use 0 with sweep.share_actors"))
    if sweep.scheduler is not None:
        problems.append(Problem(source, "sweep.share_actors", "population-based training pauses and retargets "
                                "each trial on its own: drop sweep.share_actors or sweep.scheduler"))
    shared = per_seed_hparams(spec.algorithm)
    if not shared:
        problems.append(Problem(source, "sweep.share_actors", f"{spec.algorithm} has no batched trainer; trials "
                                "can share an actor with ppo, a2c, reinforce, dqn and ddpg"))
        return problems
    allowed = ", ".join(f"hparams.{name}" for name in sorted(shared))
    for path in sweep.space:
        if not path.startswith("hparams.") or path.removeprefix("hparams.") not in shared:
            problems.append(Problem(source, f"sweep.space.{path}", f"with sweep.share_actors, trials may differ "
                                    f"only in what {spec.algorithm}'s batched trainer takes per seed: {allowed}"))
    return problems


def _objective_problems(sweep: SweepConfig, spec: ExperimentSpec, source: str) -> list[Problem]:
    """Each objective must be an `eval/*` metric the algorithm logs (a trial aggregates only those)."""
    from labfleet.algorithms import registry

    info = registry.get(spec.algorithm)
    if info.kind == "custom":  # your own code's metrics are known when it runs: a missing one fails the trial
        return []
    logged = info.eval_metrics
    field = "sweep.metrics" if sweep.multi_objective else "sweep.metric"
    return [Problem(source, field, f"{spec.algorithm} never logs {metric!r}; a sweep objective is one of its "
                    f"evaluation metrics: {', '.join(logged)}")
            for metric, _ in sweep.objectives if metric not in logged]


def create_study(sweep: SweepConfig, study_name: str, storage_url: str) -> optuna.Study:
    """The study of this name in the storage (made on the first run, loaded again on every rerun)."""
    return optuna.create_study(storage=build_storage(storage_url), study_name=study_name,
                               directions=[d for _, d in sweep.objectives], sampler=build_sampler(sweep),
                               pruner=optuna.pruners.NopPruner() if sweep.multi_objective or sweep.scheduler
                               else build_pruner(sweep),
                               load_if_exists=True)


def grid_size(sweep: SweepConfig) -> int:
    return math.prod(len(grid_values(path, p)) for path, p in sweep.space.items())
