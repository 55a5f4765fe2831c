"""The trainer interface every algorithm implements.

Contract (who calls what, from where):

- A trainer is built in the process that trains it (a Ray trial actor; in tests, the test process) as
  `TrainerClass(spec, seed, device)`: `spec` is a *resolved* `ExperimentSpec` (hparams already validated,
  every default filled in), `seed` one of `spec.seeds`, `device` a torch device string. Construction
  seeds every random generator the trainer owns from `seed` alone and touches no global RNG state that
  another trainer in the same process would read, so that the same seed gives the same metrics.
- `train_iteration()` performs one unit of learning (one rollout and update for on-policy RL, a fixed
  number of steps for off-policy RL, one epoch or a block of optimiser steps for generative models) and
  returns `{metric name: float}` using the names in `labfleet.metrics`. It is only called while
  `done` is False.
- `progress` counts in the unit of `spec.budget` (env steps, epochs or iterations); `done` is True once
  the budget is spent. `metric_step` is the x-axis for logged metrics: environment steps for RL,
  optimiser steps for generative models.
- `evaluate()` returns `eval/*` metrics. It may be called at any time, uses generators of its own (seeded
  from the seed and the evaluation count) and leaves the training state, RNGs included, untouched.
- `state_dict()` returns only tensors, numbers, strings, bools, None, lists and dicts, so that
  `torch.load(..., weights_only=True)` reads it back. `load_state_dict()` on a trainer built from the same
  spec, seed and device restores it exactly: the next actions, samples and metrics are the same as the
  original trainer's would have been.
- A trainer pickles (Ray ships it between processes): pickling stores (spec, seed, device, state_dict) and
  unpickling rebuilds from those, so subclasses need do nothing for it.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from labfleet.seeding import rng_state, set_rng_state  # noqa: F401  (where most callers import them)
from labfleet.spec.models import ExperimentSpec


class Trainer(ABC):
    hparams_model: ClassVar[type[BaseModel]]
    # False after `load_state_dict` when the checkpoint could not carry everything the trainer would need to
    # go on exactly (RL environments that cannot be saved): the driver tags the run `labfleet.resume`.
    resume_exact: bool = True

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        self.spec = spec
        self.seed = int(seed)
        self.device = torch.device(device)
        self.hp = self.hparams_model.model_validate(spec.hparams)

    # --- the interface -------------------------------------------------------------------------
    @abstractmethod
    def train_iteration(self) -> dict[str, float]: ...

    @abstractmethod
    def evaluate(self) -> dict[str, float]: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    @abstractmethod
    def progress(self) -> int:
        """Budget spent so far, in the unit of `spec.budget`."""

    @property
    def metric_step(self) -> int:
        return self.progress

    @property
    def done(self) -> bool:
        return self.progress >= self.spec.budget.total

    @abstractmethod
    def probe(self) -> np.ndarray:
        """A deterministic output that depends on every learned parameter that acts: the greedy actions
        on a fixed set of observations (RL), decoded samples from fixed latents (generative). The shared
        trainer tests compare it across checkpoint round trips."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free what the trainer started outside its own memory (rollout actors, process groups). A trial
        actor reused for the next trial calls it before building the next trainer."""

    # --- for trainers of your own that step the spec's environments --------------------------------
    def make_envs(self, n_envs: int = 1, evaluation: bool = False, stream: int = 0) -> tuple[Any, np.ndarray]:
        """The spec's environments as labfleet's own trainers make them: `env` and `env_kwargs`, every
        `env_wrappers` entry (the `train_only` ones left out when `evaluation`), on the spec's `env_backend`,
        as one vector env of `n_envs` that autoresets in the step an episode ends. Each env index is reset
        with a seed of its own derived from the trainer's seed, `evaluation` and `stream` (use another
        `stream` for each new set of evaluation episodes). Returns the vector env and its first observations."""
        from labfleet.rollout.envs import EnvMaker, derive_seed

        if self.spec.env is None:
            raise ValueError("make_envs needs a spec with `env:`")
        envs = EnvMaker.from_spec(self.spec).make_vector(n_envs, evaluation=evaluation)
        purpose = "eval" if evaluation else "env"
        obs, _ = envs.reset(seed=[derive_seed(self.seed, purpose, stream, i) for i in range(n_envs)])  # type: ignore[arg-type]
        return envs, obs

    # --- checkpoints as bytes (they travel through Ray, not a shared filesystem) ------------------
    def checkpoint_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def restore_bytes(self, data: bytes) -> None:
        """Read onto the CPU whatever device wrote it: generator states must be CPU byte tensors, and arrays
        come back through `.numpy()`; `load_state_dict` copies module and optimiser state to `self.device`."""
        self.load_state_dict(load_checkpoint(data))

    # --- pickling: rebuild from the spec and restore the state ------------------------------------
    def __reduce__(self):
        return (_rebuild, (type(self), self.spec.model_dump(mode="json"), self.seed, str(self.device),
                           self.checkpoint_bytes()))


def _rebuild(cls: type[Trainer], spec: dict, seed: int, device: str, state: bytes) -> Trainer:
    trainer = cls(ExperimentSpec.model_validate(spec), seed, device)
    trainer.restore_bytes(state)
    return trainer


def load_checkpoint(data: bytes) -> Any:
    """A checkpoint's state read onto the CPU, only tensors and plain values (`weights_only`)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def held_gpus() -> list[str] | None:
    """The GPU ids Ray assigned to this process's actor or task, or None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return [str(i) for i in ray.get_gpu_ids()]


def hide_gpus_unless_held(held: list[str] | None) -> None:
    """In a Ray worker that holds no GPU (`held == []`), empty `CUDA_VISIBLE_DEVICES` before anything touches
    CUDA: Ray 2.60 leaves the node's value to workers that reserve none."""
    if held is not None and not held:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def resolve_device(requested: str, held: list[str] | None = None, hide: bool = True) -> str:
    """The torch device a trainer uses. `held` are the GPUs Ray gave this actor (None: not in an actor, where
    torch's view decides). `auto` is CUDA only where the actor holds a GPU and torch sees one, else the CPU.
    An actor that holds no GPU never sees one (`hide_gpus_unless_held`), so a trial never computes on a GPU
    that Ray gave to another. With `hide=False` the process's `CUDA_VISIBLE_DEVICES` is left as it is (a trial
    in the driver's own process: later trials of that process may hold a GPU)."""
    if hide:
        hide_gpus_unless_held(held)
    if held is not None and not held:
        if requested.startswith("cuda"):
            raise RuntimeError(f"device {requested!r} was requested but this trial holds no GPU "
                               "(set resources.gpus_per_trial)")
        return "cpu"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but torch sees no CUDA device here")
    return requested


