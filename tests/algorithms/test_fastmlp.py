"""PPO's hand-written backward pass (algorithms/rl/fastmlp.py) against autograd on the one loss definition
(`ppo_minibatch_loss`): the same gradients on one minibatch, the same parameters and statistics after whole
updates, for categorical and Gaussian policies and each option the kernel covers; checkpoints move between
the two; what it does not cover keeps autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.fastmlp import FastPPOUpdate
from labfleet.algorithms.rl.ppo import PPOCoefficients, PPOMinibatch, PPOTrainer, ppo_minibatch_loss
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

CARTPOLE = {"budget.env_steps": 2048, "hparams.n_steps": 32, "hparams.n_epochs": 4}
PENDULUM = {"env": "Pendulum-v1", "budget.env_steps": 2048, "hparams.n_steps": 64, "hparams.n_epochs": 4,
            "hparams.learning_rate": 3.0e-4, "hparams.clip_range": 0.2}
OPTIONS = [
    pytest.param(CARTPOLE, id="categorical"),
    pytest.param({**CARTPOLE, "hparams.ent_coef": 0.05, "hparams.clip_range_vf": 0.2,
                  "hparams.activation": "relu", "hparams.net_arch": [32, 16, 8]}, id="categorical-entropy-vfclip-relu"),
    pytest.param({**CARTPOLE, "hparams.normalize_advantage": False, "hparams.max_grad_norm": None},
                 id="raw-advantages"),
    pytest.param(PENDULUM, id="gaussian"),
    pytest.param({**PENDULUM, "hparams.ent_coef": 0.01, "hparams.clip_range_vf": 0.5,
                  "hparams.normalize": {"obs": True}}, id="gaussian-entropy-vfclip-normalized"),
]


def _trainer(overrides: dict, fast: bool) -> PPOTrainer:
    spec = load_spec(EXPERIMENTS / "cartpole_ppo.yaml", overrides)
    trainer = registry.get("ppo").trainer(spec, 0, "cpu")
    if not fast:
        trainer.fast = None
    return trainer


@pytest.mark.parametrize("overrides", OPTIONS)
def test_the_gradients_are_autograds(overrides):
    """On a minibatch from a real rollout, after some training (ratios off 1, some clipped)."""
    trainer = _trainer(overrides, fast=True)
    assert trainer.fast is not None
    trainer.train_iteration()
    rollout, _ = trainer.collect(trainer.actor, trainer.hp.n_envs, trainer.hp.n_steps)
    obs = trainer.as_tensor(rollout.obs).flatten(0, 1)[:64]
    actions = trainer.as_tensor(rollout.actions).flatten(0, 1)[:64]
    generator = torch.Generator().manual_seed(0)
    logp_old = trainer.ac(obs, actions).logp.detach() + 0.3 * torch.randn(64, generator=generator)
    batch = PPOMinibatch(obs, actions, logp_old, *(torch.randn(64, generator=generator) for _ in range(3)))
    coef = PPOCoefficients(0.2, 1.0, trainer.hp.vf_coef, trainer.hp.ent_coef)
    loss, expected_stats = ppo_minibatch_loss(trainer.ac, None, batch, coef, trainer.hp)
    trainer.ac.zero_grad(set_to_none=True)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in trainer.ac.named_parameters()}
    stats = trainer.fast.gradients(batch, coef, trainer.hp)
    for name, p in trainer.ac.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    for key, value in expected_stats.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert 0 < float(stats["clip"]) < 1  # both branches of the clipped objective were taken


@pytest.mark.parametrize("overrides", OPTIONS)
def test_updates_match_autograds_and_checkpoints_move_between_them(overrides):
    """Two iterations each (collect, then epochs of minibatch updates), the second after each side took
    the other's checkpoint: the parameters and the logged statistics agree within float tolerance."""
    fast, slow = _trainer(overrides, fast=True), _trainer(overrides, fast=False)
    logged = [fast.train_iteration(), slow.train_iteration()]
    fast_state, slow_state = copy.deepcopy(fast.state_dict()), copy.deepcopy(slow.state_dict())
    fast.load_state_dict(slow_state)
    slow.load_state_dict(fast_state)
    logged += [fast.train_iteration(), slow.train_iteration()]
    for (name, a), b in zip(fast.ac.named_parameters(), slow.ac.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for key in (k for k in logged[0] if not k.startswith("time/")):  # time/sps: the point of the kernel
        assert logged[0][key] == pytest.approx(logged[1][key], rel=1e-3, abs=1e-5), key
        assert logged[2][key] == pytest.approx(logged[3][key], rel=1e-3, abs=1e-5), key


def test_what_the_kernel_does_not_cover_keeps_autograd():
    kl = _trainer({**CARTPOLE, "hparams.loss": "kl_penalty"}, fast=True)
    assert kl.fast is None and FastPPOUpdate.why_not(kl.ac, kl.hp) == "loss kl_penalty"
    plain = _trainer(CARTPOLE, fast=True)
    assert plain.fast is not None
