"""Optimisers and learning-rate schedules: exact values against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from labfleet.algorithms.optim import (
    OptimHParams,
    ScheduledOptimizer,
    build_optimizer,
    scheduled_learning_rate,
)


def _schedule(**cfg):
    return OptimHParams.model_validate({"learning_rate": 0.1, "lr_schedule": cfg}).schedule


@pytest.mark.parametrize(("cfg", "update", "progress", "expected"), [
    ({"type": "constant"}, 57, 0.7, 0.1),
    ({"type": "linear"}, 0, 0.0, 0.1),
    ({"type": "linear"}, 10, 0.25, 0.075),
    ({"type": "linear"}, 10, 1.0, 0.0),
    ({"type": "linear", "end_factor": 0.1}, 10, 0.5, 0.055),
    ({"type": "step", "step_size": 10, "gamma": 0.5}, 9, 0.0, 0.1),
    ({"type": "step", "step_size": 10, "gamma": 0.5}, 10, 0.0, 0.05),
    ({"type": "step", "step_size": 10, "gamma": 0.5}, 25, 0.0, 0.025),
    ({"type": "exponential", "gamma": 0.9}, 3, 0.0, 0.1 * 0.9 ** 3),
    ({"type": "inverse_time", "decay_rate": 0.5}, 4, 0.0, 0.1 / 3),
])
def test_schedule_values(cfg, update, progress, expected):
    assert scheduled_learning_rate(_schedule(**cfg), 0.1, update, progress) == pytest.approx(expected, abs=1e-12)


def test_rl_zoo_lin_string():
    hp = OptimHParams.model_validate({"learning_rate": "lin_7.3e-4"})
    assert hp.initial_learning_rate == pytest.approx(7.3e-4)
    assert hp.schedule.type == "linear"
    assert scheduled_learning_rate(hp.schedule, hp.initial_learning_rate, 5, 0.5) == pytest.approx(3.65e-4)


@pytest.mark.parametrize("bad", ["lin_", "lin_-1", "linear_0.1", "0.1x", 0, -1e-3, float("nan")])
def test_bad_learning_rates(bad):
    with pytest.raises(ValidationError):
        OptimHParams.model_validate({"learning_rate": bad})


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rmsprop", "adam", "adamw"])
def test_each_optimizer_minimises_a_quadratic(kind):
    hp = OptimHParams.model_validate({"learning_rate": 0.05, "optimizer": {"type": kind}, "max_grad_norm": None})
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = ScheduledOptimizer([x], hp)
    assert type(opt.optimizer).__name__.lower() == kind
    start = float((x.detach() ** 2).sum())
    for _ in range(200):
        opt.step((x ** 2).sum(), 0.0)
    assert float((x.detach() ** 2).sum()) < 0.5 * start


def test_sgd_nesterov_momentum_options_reach_torch():
    hp = OptimHParams.model_validate({"optimizer": {"type": "sgd", "momentum": 0.9, "nesterov": True}})
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], hp.optimizer, 0.1)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True


def test_schedule_is_applied_on_each_update():
    hp = OptimHParams.model_validate({"learning_rate": 1.0, "optimizer": {"type": "sgd"},
                                      "lr_schedule": {"type": "step", "step_size": 2, "gamma": 0.5},
                                      "max_grad_norm": None})
    x = torch.nn.Parameter(torch.tensor([0.0]))
    opt = ScheduledOptimizer([x], hp)
    rates = []
    for _ in range(5):
        opt.step(-x.sum(), 0.0)  # gradient -1: x grows by exactly the learning rate
        rates.append(opt.learning_rate)
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert x.item() == pytest.approx(3.25)


def test_gradient_norm_clipping():
    hp = OptimHParams.model_validate({"learning_rate": 1.0, "optimizer": {"type": "sgd"}, "max_grad_norm": 1.0})
    x = torch.nn.Parameter(torch.zeros(2))
    opt = ScheduledOptimizer([x], hp)
    norm = opt.step(-(x * torch.tensor([3.0, 4.0])).sum(), 0.0)  # gradient (-3, -4), norm 5
    assert norm == pytest.approx(5.0)
    assert x.detach().tolist() == pytest.approx([0.6, 0.8])  # clipped to unit norm
    assert math.isclose(x.detach().norm().item(), 1.0, rel_tol=1e-6)


def test_optimizer_fields_must_fit_type():
    for cfg in ({"type": "adam", "momentum": 0.9}, {"type": "sgd", "nesterov": True},
                {"type": "sgd", "eps": 1e-5}, {"type": "rmsprop", "betas": [0.5, 0.5]}):
        with pytest.raises(ValidationError):
            OptimHParams.model_validate({"optimizer": cfg})
