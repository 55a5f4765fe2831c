"""What the registry knows of an algorithm (its own module, so that the code registering algorithms and the
registry itself import it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from labfleet import metrics as M

if TYPE_CHECKING:
    from labfleet.algorithms.base import Trainer

ActionKind = Literal["discrete", "continuous"]
ObservationKind = Literal["vector", "discrete", "image"]


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    kind: Literal["rl", "generative", "custom"]
    hparams: type[BaseModel]
    trainer: type[Trainer]
    summary: str
    action_spaces: tuple[ActionKind, ...] = ("discrete", "continuous")
    observation_spaces: tuple[ObservationKind, ...] = ("vector", "discrete")
    needs_transition_model: bool = False
    # its sample-quality metrics on an image dataset use a classifier trained on the dataset's labels (checked
    # at validation: the dataset's files must have them)
    needs_image_labels: bool = False
    rollout_workers: bool = True  # can spread its environments over Ray rollout actors
    seed_dependent: bool = True  # False for planners, whose training the seed does not touch
    primary_metric: str = M.EVAL_RETURN_MEAN  # "" for your own code: the first eval/* metric it reports
    dataset_metrics: dict[str, str] = field(default_factory=dict)  # the primary metric on these datasets
    # The `eval/*` metrics it can log: what a sweep objective may name (checked by `labfleet validate`).
    eval_metrics: tuple[str, ...] = (M.EVAL_RETURN_MEAN, M.EVAL_RETURN_STD)
    budget_units: tuple[str, ...] = ("env_steps",)
    # Hyperparameters a trainer rebuilt from a checkpoint with new values honours mid-training (read at
    # each use, not fixed at construction): what population-based training may mutate.
    mutable_hparams: tuple[str, ...] = ()
    # Seeds trained together (`resources.seeds_per_actor`, `sweep.share_actors`): "package.module:Class" of the
    # group that trains the seeds' networks stacked ("": none, the seeds train in turn); the hyperparameters it
    # takes from each member (`per_seed_hparams`: members may differ in these) and those it honours when every
    # member has the same value (`group_hparams`). A member whose value of any other hyperparameter is not its
    # default trains in turn: a new option is never ignored by the stacked path.
    seed_group: str = ""
    per_seed_hparams: tuple[str, ...] = ()
    group_hparams: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    def primary_metric_for(self, dataset: str | None) -> str:
        """The metric that sums a run up: on some datasets another than `primary_metric` (the GAN's)."""
        return self.dataset_metrics.get(dataset or "", self.primary_metric)
