"""Pydantic models of experiment specs and suites (ARCHITECTURE section 3).

Field names are a contract with users and their scripts. Unknown keys are errors everywhere. `hparams`
is a plain mapping here; it is validated by the algorithm's own model (see `labfleet.spec.loading`), and
the resolved spec carries it back with every default filled in.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from labfleet import metrics as M

# fullmatch, not match with "$": "$" also matches before a final newline ("good\n" would pass)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# An MLflow experiment or Optuna study name: it becomes a directory under the store's artifact root and is
# shown in terminals and HTML, so no path separators, "..", markup brackets or control characters.
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.,:+=@#-]*(/[A-Za-z0-9][A-Za-z0-9 _.,:+=@#-]*)*")


def _check_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name: use letters, digits, '_', '.' and '-', starting with a "
                         f"letter or digit, at most 128 characters")
    return value


def _check_label(value: str) -> str:
    if len(value) > 200 or not LABEL_PATTERN.fullmatch(value) or ".." in value or value != value.strip():
        raise ValueError(f"{value!r} is not a valid experiment or study name: use letters, digits, spaces and "
                         "'_ . , : + = @ # -', with '/' only between parts that start with a letter or digit "
                         "(ALE/Pong-v5); no '\\', '..' or brackets; at most 200 characters")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Label = Annotated[str, AfterValidator(_check_label)]


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Budget(StrictModel):
    """How long each seed trains. Exactly one field is set."""

    env_steps: PositiveInt | None = Field(None, description="Environment steps per seed (RL).")
    epochs: PositiveInt | None = Field(None, description="Passes over the training split (generative).")
    iterations: PositiveInt | None = Field(None, description="Optimiser steps (generative) or sweeps (tabular).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        set_fields = [k for k in ("env_steps", "epochs", "iterations") if getattr(self, k) is not None]
        if len(set_fields) != 1:
            raise ValueError(
                f"set exactly one of env_steps, epochs, iterations (got {', '.join(set_fields) or 'none'})"
            )
        return self

    @property
    def unit(self) -> str:
        return next(k for k in ("env_steps", "epochs", "iterations") if getattr(self, k) is not None)

    @property
    def total(self) -> int:
        return int(getattr(self, self.unit))


class Resources(StrictModel):
    """What one trial (one seed) reserves on the Ray cluster, as one placement group."""

    rollout_workers: NonNegativeInt = Field(
        0, description="Ray rollout actors per trial; 0 samples in the trial's own process."
    )
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs for the trial actor (its torch threads).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs for each rollout actor.")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs for the trial actor; may be fractional.")
    max_retries: NonNegativeInt = Field(
        2, description="Times a trial whose actor died is restarted from its last checkpoint."
    )
    data_parallel: PositiveInt = Field(
        1, description="Workers training one trial together (torch.distributed: gloo on CPU, NCCL on CUDA); "
                       "each gets cpus_per_trial and gpus_per_trial / data_parallel (generative models)."
    )
    seeds_per_actor: PositiveInt = Field(
        1, description="Seeds of a trial trained together in one trial actor (one process, cpus_per_trial for "
                       "all of them): PPO, A2C, REINFORCE, DQN and DDPG on vector observations stack their "
                       "networks and step them as one (torch.func); other algorithms train them in turn. Each "
                       "seed keeps its run, metrics, checkpoint and retries."
    )
    stall_warning_s: float = Field(
        600.0, ge=0, allow_inf_nan=False,
        description="Seconds a seed may go without progress (no step, no report) before the driver warns that "
                    "its code or environment may hang; 0 never warns. Its metrics so far are logged meanwhile."
    )


class EvalConfig(StrictModel):
    """Evaluation with the deterministic policy on separately seeded environments."""

    episodes: PositiveInt = Field(10, description="Episodes per evaluation (RL).")
    every_steps: PositiveInt | None = Field(
        None, description="Evaluate (and checkpoint) every this many steps; default: a tenth of the budget."
    )
    select_best: bool = Field(
        False, description="RL with a policy network (PPO, A2C, REINFORCE, TRPO, DQN, DDPG): the final policy is "
        "the best of the networks evaluated during training, the end of training included, as rl-zoo's best "
        "model: the 4 best evaluated are evaluated again on the same fresh episodes and the best mean of the two "
        "evaluations wins. The final eval/* metrics evaluate the winner once more on fresh episodes; select/step "
        "logs when it was trained, select/last_return_mean the evaluation of the network training ended with; "
        "the final checkpoint holds it.")
    video: bool = Field(False, description="Record one episode of the final policy as videos/final.mp4 of the "
                        "seed run (gymnasium's RecordVideo; needs moviepy: labfleet[video]).")


class TrackingConfig(StrictModel):
    """Where runs are recorded. URI precedence: --tracking-uri > this > $MLFLOW_TRACKING_URI > sqlite."""

    experiment: Label | None = Field(None, description="MLflow experiment name; default: the spec's name.")
    uri: str | None = Field(None, description="MLflow tracking URI.")


class ParamSpace(StrictModel):
    """One searched dimension, mirroring Optuna's suggest_* arguments."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = Field(None, max_length=1000, description="The values a categorical takes "
                                      "(at most 1000).")

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpace:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None:
                raise ValueError("categorical takes `choices`, not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log scale needs low > 0 and no `step`")
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not `choices`")
        return self


class SamplerConfig(StrictModel):
    model_config = ConfigDict(extra="allow")  # further keys are the Optuna sampler's keyword arguments
    type: Literal["tpe", "random", "cmaes", "gp", "qmc", "grid"] = "tpe"
    seed: int | None = None


class PrunerConfig(StrictModel):
    model_config = ConfigDict(extra="allow")  # further keys are the Optuna pruner's keyword arguments
    type: Literal["nop", "median", "percentile", "successive_halving", "hyperband", "threshold"] = "median"


Direction = Literal["maximize", "minimize"]


class PBTConfig(StrictModel):
    """Population-based training (Jaderberg et al. 2017, with the semantics of Ray Tune's
    `PopulationBasedTraining`): the `n_trials` trials are the population; at every perturbation point a
    trial in the bottom quantile takes the checkpoint of a top-quantile trial (exploit) and perturbs or
    resamples the mutable hyperparameters (explore)."""

    type: Literal["pbt"] = "pbt"
    perturbation_interval: PositiveInt = Field(description="Budget units (env steps, iterations) between "
                                               "perturbation points; a multiple of eval.every_steps ranks on "
                                               "fresh evaluations.")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="Top and bottom fraction of the population.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="Explore by resampling from the space "
                                        "instead of perturbing.")
    perturbation_factors: tuple[PositiveFloat, PositiveFloat] = Field((0.8, 1.2), description="Explore: multiply "
                                                                      "a numeric value by one of these.")
    mutations: dict[str, ParamSpace] = Field(min_length=1, description="PATH: SPACE of each mutable "
                                             "hyperparameter (only those the algorithm honours mid-training).")
    seed: int | None = Field(None, description="Seed of the scheduler's own choices.")


# A sweep's scheduler's config: a model per scheduler, told apart by `type` (`orchestration/schedulers.py`
# builds the scheduler from it). Population-based training is the one there is.
SchedulerConfig = PBTConfig


class SweepConfig(StrictModel):
    """Used by `labfleet sweep`: an Optuna study over paths of this spec."""

    metric: str = Field(M.EVAL_RETURN_MEAN, description="Objective: mean over seeds of its final value.")
    direction: Direction = "maximize"
    metrics: list[str] | None = Field(None, description="Multi-objective: several metrics (with `directions`); "
                                      "Optuna does not prune such studies.")
    directions: list[Direction] | None = Field(None, description="One per entry of `metrics`.")
    n_trials: PositiveInt = 20
    max_parallel: PositiveInt = 2
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///optuna.db.")
    study_name: Label | None = Field(None, description="Default: the spec's name.")
    max_retries: NonNegativeInt = Field(2, description="Restarts from the last checkpoint of a trial whose "
                                        "actor died (overrides resources.max_retries in a sweep).")
    max_consecutive_failures: PositiveInt = Field(5, description="Stop asking for trials after this many "
                                                  "failed in a row: a sweep that cannot succeed ends (exit 1).")
    space: dict[str, ParamSpace] = Field(default_factory=dict)
    scheduler: SchedulerConfig | None = Field(None, description="A trial scheduler: population-based training "
                                              "(the pruner is not used).")
    share_actors: bool = Field(False, description="Trials started together pack their seeds into shared trial "
                               "actors of up to resources.seeds_per_actor seeds, trained batched, each with its "
                               "own hyperparameters (PPO, A2C, REINFORCE, DQN, DDPG; the space may only hold "
                               "hyperparameters that keep the networks' shapes).")

    @model_validator(mode="after")
    def _objectives(self) -> SweepConfig:
        if (self.metrics is None) != (self.directions is None):
            raise ValueError("`metrics` and `directions` go together (one direction per metric)")
        if self.metrics is not None and self.directions is not None:
            if len(self.metrics) != len(self.directions) or len(self.metrics) < 2:
                raise ValueError(f"a multi-objective sweep needs as many `directions` as `metrics`, at least 2 "
                                 f"(got {len(self.metrics)} metrics, {len(self.directions)} directions)")
            if len(set(self.metrics)) != len(self.metrics):
                raise ValueError("`metrics` names a metric twice")
        return self

    @property
    def objectives(self) -> list[tuple[str, Direction]]:
        """[(metric, direction)]: one pair, or several for a multi-objective study."""
        if self.metrics is not None and self.directions is not None:
            return list(zip(self.metrics, self.directions, strict=True))
        return [(self.metric, self.direction)]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


class WrapperSpec(StrictModel):
    """One environment wrapper: a class of `gymnasium.wrappers` or a `package.module:Class` subclass of
    `gymnasium.Wrapper`, built as `Class(env, **kwargs)`."""

    type: str = Field(description='A gymnasium.wrappers class ("TimeLimit") or "package.module:Class".')
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments after the env.")
    train_only: bool = Field(False, description="Wrap the training envs only, not the evaluation ones (reward "
                             "clipping: evaluations then report the environment's own returns).")


class ExperimentSpec(StrictModel):
    """One experiment: an algorithm on an environment (or dataset), for each of several seeds."""

    name: Name = Field(description="Letters, digits, '_', '.', '-'.")
    algorithm: str = Field(description="A registered algorithm (`labfleet list algorithms`).")
    env: str | None = Field(None, description='A gymnasium id, or "package.module:Class" (RL).')
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of gym.make.")
    env_wrappers: list[WrapperSpec] = Field(default_factory=list, max_length=32, description="Wrappers applied "
                                            "in order to every env instance (training, rollout workers, "
                                            "evaluation).")
    env_backend: Literal["gymnasium", "envpool"] = Field(
        "gymnasium", description="Who steps the environments: gymnasium's vector env, or EnvPool's C++ envs "
        "(`pip install 'labfleet[envpool]'`; `env` is then an EnvPool id, env_kwargs its options, no env_wrappers).")
    dataset: str | None = Field(None, description="A dataset name (generative models; `labfleet list datasets`).")
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict, description="Arguments of the dataset's loader "
                                           "(`path` for mnist / fashion_mnist).")
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0], min_length=1, description="One trial each.")
    budget: Budget
    hparams: dict[str, Any] = Field(default_factory=dict, description="Validated by the algorithm's model.")
    resources: Resources = Field(default_factory=Resources)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N; auto picks CUDA when present.")
    sweep: SweepConfig | None = None
    description: str = ""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct (got {seeds})")
        return seeds


class SuiteEntry(StrictModel):
    """One entry of a suite: a spec file (relative to the suite file) with overrides."""

    spec: str
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted KEY: VALUE overrides.")
    sweep: bool = Field(False, description="Run the entry as `labfleet sweep` (its spec needs a `sweep:` section); "
                        "sweeps run after the suite's other entries, under the same suite run.")


class SuiteSpec(StrictModel):
    name: Name
    description: str = ""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    experiments: list[SuiteEntry] = Field(min_length=1, max_length=500, description="The specs to run (at most 500).")
