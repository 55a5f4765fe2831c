"""Optimisers and learning-rate schedules: exact values against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

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
    if kind in ("adam", "adamw"):  # torch's fused kernel, without torch.optim (see below)
        assert type(opt.optimizer).__name__ == "FusedAdam"
        assert opt.optimizer.defaults["decoupled_weight_decay"] is (kind == "adamw")
    else:
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


def _net_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    twin.load_state_dict(net.state_dict())
    return net, twin


def _steps(pairs, batches) -> None:
    for x in batches:
        for net, opt in pairs:
            opt.zero_grad(set_to_none=True)
            net(x).pow(2).mean().backward()
            opt.step()


@pytest.mark.parametrize(("kind", "weight_decay"), [("adam", 0.0), ("adam", 0.01), ("adamw", 0.01)])
def test_fused_adam_is_torch_adam_to_the_bit_and_their_checkpoints_swap(kind, weight_decay):
    """labfleet's Adam (the fused kernel without torch.optim) against torch.optim's fused Adam: the same
    parameters to the bit after 20 steps, with each one's state loaded into the other half-way."""
    from labfleet.algorithms.optim import FusedAdam

    cfg = OptimHParams.model_validate({"optimizer": {"type": kind, "eps": 1e-5, "weight_decay": weight_decay}})
    net, twin = _net_pair()
    ours = build_optimizer(net.parameters(), cfg.optimizer, 1e-3)
    assert isinstance(ours, FusedAdam)
    torch_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    theirs = torch_class(twin.parameters(), lr=1e-3, eps=1e-5, weight_decay=weight_decay, fused=True)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 4, generator=generator) for _ in range(20)]
    _steps([(net, ours), (twin, theirs)], batches[:10])
    mine, torchs = ours.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    ours.load_state_dict(torchs)
    theirs.load_state_dict(mine)
    _steps([(net, ours), (twin, theirs)], batches[10:])
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(net[0].weight, _net_pair()[0][0].weight)  # it trained


def test_training_never_imports_dynamo():
    """Every torch.optim optimiser imports torch._dynamo on its first call, 1.2 s of CPU in each trial
    process; a PPO trainer's build and update do without it (a fresh interpreter, as a trial actor is)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from labfleet.orchestration.trial import TrialWorker\n"
            "from labfleet.spec.loading import load_spec\n"
            "spec = load_spec('experiments/cartpole_ppo.yaml').model_dump(mode='json')\n"
            "spec['budget'] = {'env_steps': 512}\n"
            "worker = TrialWorker(spec, 0, None)\n"
            "worker.advance(0.01)\n"
            "print('torch._dynamo' in sys.modules, 'torch.optim' in sys.modules)\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]
