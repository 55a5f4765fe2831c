"""Optimisers, learning-rate schedules and gradient clipping, shared by every algorithm.

Every algorithm's hyperparameter model inherits `OptimHParams`, so these fields read the same
everywhere:

    learning_rate: 3.0e-4            # or rl-zoo's "lin_3.0e-4": linear from 3e-4 to 0 over the budget
    lr_schedule: {type: step, step_size: 100, gamma: 0.5}
    optimizer: {type: adam, eps: 1.0e-5}
    max_grad_norm: 0.5

Schedules are pure functions of (update count t, budget progress p in [0, 1]):
    constant     lr0
    linear       lr0 + (end_factor * lr0 - lr0) * p          (SB3/rl-zoo's linear schedule when end_factor=0)
    step         lr0 * gamma ** floor(t / step_size)
    exponential  lr0 * gamma ** t
    inverse_time lr0 / (1 + decay_rate * t)                  (the 1/t schedule of stochastic approximation)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

LIN_PATTERN = re.compile(r"^lin_([0-9.eE+-]+)$")
TORCH_DEFAULT_EPS = {"adagrad": 1e-10, "rmsprop": 1e-8, "adam": 1e-8, "adamw": 1e-8}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConstantSchedule(_Strict):
    type: Literal["constant"] = "constant"


class LinearSchedule(_Strict):
    type: Literal["linear"] = "linear"
    end_factor: float = Field(0.0, ge=0, description="Final rate as a fraction of the initial one.")


class StepSchedule(_Strict):
    type: Literal["step"] = "step"
    step_size: PositiveInt = Field(description="Updates between decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="Factor applied every step_size updates.")


class ExponentialSchedule(_Strict):
    type: Literal["exponential"] = "exponential"
    gamma: float = Field(gt=0, le=1, description="Factor applied every update.")


class InverseTimeSchedule(_Strict):
    type: Literal["inverse_time"] = "inverse_time"
    decay_rate: float = Field(gt=0, description="lr = lr0 / (1 + decay_rate * t).")


Schedule = Annotated[
    ConstantSchedule | LinearSchedule | StepSchedule | ExponentialSchedule | InverseTimeSchedule,
    Field(discriminator="type"),
]


class OptimizerConfig(_Strict):
    """torch.optim settings. Fields that an optimiser does not take must stay at their defaults."""

    type: Literal["sgd", "adagrad", "rmsprop", "adam", "adamw"] = "adam"
    eps: PositiveFloat | None = Field(None, description="Numerical epsilon; default: torch's.")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (decoupled for adamw).")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd and rmsprop only.")
    nesterov: bool = Field(False, description="sgd only; needs momentum > 0.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam and adamw only.")
    alpha: float = Field(0.99, gt=0, lt=1, description="rmsprop's smoothing constant.")

    @model_validator(mode="after")
    def _fits_type(self) -> OptimizerConfig:
        if self.nesterov and (self.type != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs type: sgd and momentum > 0")
        if self.momentum and self.type not in ("sgd", "rmsprop"):
            raise ValueError(f"momentum applies to sgd and rmsprop, not {self.type}")
        if self.betas != (0.9, 0.999) and self.type not in ("adam", "adamw"):
            raise ValueError(f"betas apply to adam and adamw, not {self.type}")
        if self.eps is not None and self.type == "sgd":
            raise ValueError("sgd takes no eps")
        return self


class StepSizeHParams(_Strict):
    """A learning rate (step size) and its schedule: shared by every algorithm, tabular ones included."""

    learning_rate: float | str = Field(
        3e-4, description='Initial learning rate; "lin_<value>" is a linear decay from <value> to 0.'
    )
    lr_schedule: Schedule = Field(default_factory=ConstantSchedule, description="How the rate decays.")

    @field_validator("learning_rate")
    @classmethod
    def _rate(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            match = LIN_PATTERN.match(value)
            if not match:
                raise ValueError(f'expected a number or "lin_<number>", got {value!r}')
            try:
                rate = float(match.group(1))
            except ValueError:
                raise ValueError(f'expected a number after "lin_", got {value!r}') from None
        else:
            rate = value
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"the learning rate must be a positive number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _lin_means_linear(self) -> StepSizeHParams:
        if isinstance(self.learning_rate, str) and self.lr_schedule.type != "constant":
            raise ValueError('"lin_<value>" already is a linear schedule: drop lr_schedule or use a number')
        return self

    @property
    def initial_learning_rate(self) -> float:
        if isinstance(self.learning_rate, str):
            match = LIN_PATTERN.match(self.learning_rate)
            assert match is not None  # checked by the validator
            return float(match.group(1))
        return float(self.learning_rate)

    @property
    def schedule(self) -> ConstantSchedule | LinearSchedule | StepSchedule | ExponentialSchedule \
            | InverseTimeSchedule:
        return LinearSchedule(end_factor=0.0) if isinstance(self.learning_rate, str) else self.lr_schedule


class OptimHParams(StepSizeHParams):
    """Optimisation fields that every gradient-based algorithm's hyperparameters share."""

    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    max_grad_norm: PositiveFloat | None = Field(0.5, description="Clip the global gradient norm; null: off.")


def scheduled_learning_rate(schedule, lr0: float, update: int, progress: float) -> float:
    """The learning rate after `update` optimiser updates at budget `progress` (0 to 1)."""
    if schedule.type == "constant":
        return lr0
    if schedule.type == "linear":
        return lr0 + (schedule.end_factor * lr0 - lr0) * min(max(progress, 0.0), 1.0)
    if schedule.type == "step":
        return lr0 * schedule.gamma ** (update // schedule.step_size)
    if schedule.type == "exponential":
        return lr0 * schedule.gamma ** update
    if schedule.type == "inverse_time":
        return lr0 / (1.0 + schedule.decay_rate * update)
    raise ValueError(f"unknown schedule {schedule.type!r}")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig,
                    lr: float) -> torch.optim.Optimizer | FusedAdam:
    params = list(params)
    eps = cfg.eps if cfg.eps is not None else TORCH_DEFAULT_EPS.get(cfg.type, 1e-8)
    if cfg.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.type == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=cfg.weight_decay, eps=eps)
    if cfg.type == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.alpha, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, eps=eps)
    if cfg.type in ("adam", "adamw") and FusedAdam.supports(params):
        return FusedAdam(params, lr=lr, betas=cfg.betas, eps=eps, weight_decay=cfg.weight_decay,
                         decoupled=cfg.type == "adamw")
    # The fused kernels (one pass over all parameters) give the same update as the per-tensor loop, faster.
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if cfg.type == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=eps, **fused)
    if cfg.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=eps, **fused)
    raise ValueError(f"unknown optimizer {cfg.type!r}")


class FusedAdam:
    """Adam (or AdamW, `decoupled`) as `torch.optim.Adam(..., fused=True)` computes it, through the same fused
    kernel (`torch._fused_adam_`), without `torch.optim`'s machinery: every `torch.optim.Optimizer` imports
    `torch._dynamo` on its first call (about 1.2 s of CPU in each process that trains). The same update to
    the bit, and the same `state_dict()`, so that checkpoints move between the two either way.

    What callers use of an optimiser: `param_groups[0]["lr"]`, `state[param]`, `zero_grad`, `step`,
    `state_dict`, `load_state_dict`."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False):
        params = list(params)
        self.decoupled = decoupled
        self.defaults: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                         "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                         "differentiable": False, "fused": True, "decoupled_weight_decay": decoupled}
        self.params: list[torch.Tensor] = params
        self.param_groups: list[dict[str, Any]] = [{"params": params, **self.defaults}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @staticmethod
    def supports(params: Sequence[torch.Tensor]) -> bool:
        """The fused kernel takes floating-point tensors on the CPU or a CUDA device."""
        return hasattr(torch, "_fused_adam_") and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state.get(p)
        if not state:
            state = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        states = [self._state(p) for p in params]
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        by_device: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault((p.device, p.dtype), []).append(i)
        for indices in by_device.values():
            steps = [states[i]["step"] for i in indices]
            torch._foreach_add_(steps, 1)
            kernel([params[i] for i in indices], [grads[i] for i in indices],
                   [states[i]["exp_avg"] for i in indices], [states[i]["exp_avg_sq"] for i in indices], [],
                   steps, amsgrad=False, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def state_dict(self) -> dict:
        """`torch.optim.Adam.state_dict()`'s layout: parameters by index, the group's settings."""
        group, params = self.param_groups[0], self.params
        return {"state": {i: dict(self.state[p]) for i, p in enumerate(params) if self.state.get(p)},
                "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                                  "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """A state from `state_dict()` or from `torch.optim.Adam`/`AdamW` over the same parameters."""
        groups = state_dict["param_groups"]
        params = self.params
        if len(groups) != 1 or len(groups[0]["params"]) != len(params):
            raise ValueError("the saved optimiser state is of other parameters: "
                             f"{[len(g['params']) for g in groups]} against [{len(params)}]")
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in groups[0]:
                self.param_groups[0][key] = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        self.state = {}
        for index, p in zip(groups[0]["params"], params, strict=True):
            saved = state_dict["state"].get(index)
            if saved:
                self.state[p] = {"step": torch.as_tensor(saved["step"]).to(dtype=torch.float32, device=p.device),
                                 "exp_avg": saved["exp_avg"].to(dtype=p.dtype, device=p.device),
                                 "exp_avg_sq": saved["exp_avg_sq"].to(dtype=p.dtype, device=p.device)}


class ScheduledOptimizer:
    """An optimiser with its schedule and gradient clipping: `step(loss, progress)` does one update."""

    def __init__(self, params: Iterable[torch.nn.Parameter], hp: OptimHParams):
        self.params = list(params)
        self.hp = hp
        # Called between backward and clipping (data-parallel training averages the gradients there).
        self.grad_hook: Callable[[list[torch.nn.Parameter]], None] | None = None
        self.lr0 = hp.initial_learning_rate
        self.optimizer = build_optimizer(self.params, hp.optimizer, self.lr0)
        self.updates = 0

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, loss: torch.Tensor, progress: float) -> float:
        """Backpropagate `loss`, clip, update; returns the gradient norm before clipping."""
        return float(self.step_tensor(loss, progress))

    def step_tensor(self, loss: torch.Tensor, progress: float) -> torch.Tensor:
        """`step`, with the gradient norm as a 0-d tensor on the parameters' device: reading it is left to
        the caller, who reads a step's numbers together (one host sync on a GPU instead of one per value)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.step_gradients(progress)

    def step_gradients(self, progress: float) -> torch.Tensor:
        """`step_tensor` where the gradients are already in the parameters' `.grad` (a hand-written
        backward pass: `rl/fastmlp.py`)."""
        lr = scheduled_learning_rate(self.hp.schedule, self.lr0, self.updates, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.grad_hook is not None:
            self.grad_hook(self.params)
        if self.hp.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm, foreach=True)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.params if p.grad is not None])
            )
        self.optimizer.step()
        self.updates += 1
        return norm.detach()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
