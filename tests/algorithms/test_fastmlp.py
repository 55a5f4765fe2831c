"""The hand-written backward passes of PPO, REINFORCE and A2C, and DQN (algorithms/rl/fastmlp.py) against
autograd on the one loss definition (`ppo_minibatch_loss`, `policy_gradient_loss`, `dqn_minibatch_loss`): the
same gradients on one minibatch, the same parameters and statistics after whole updates, for each option the
kernels cover (categorical and Gaussian policies; DQN's targets and losses); checkpoints move between the two;
what they do not cover keeps autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.dqn import dqn_minibatch_loss, targets
from labfleet.algorithms.rl.fastmlp import FastDQNUpdate, FastPPOUpdate
from labfleet.algorithms.rl.ppo import PPOCoefficients, PPOMinibatch, PPOTrainer, ppo_minibatch_loss
from labfleet.algorithms.rl.reinforce import PolicyGradientBatch, policy_gradient_loss
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


SPECS = {"ppo": "cartpole_ppo.yaml", "dqn": "cartpole_dqn.yaml", "reinforce": "cartpole_reinforce.yaml",
         "a2c": "cartpole_a2c.yaml"}


def _build(algo: str, overrides: dict, fast: bool):
    """Seed 0 of the algorithm's shipped CartPole spec with the overrides; without the kernel unless `fast`."""
    trainer = registry.get(algo).trainer(load_spec(EXPERIMENTS / SPECS[algo], overrides), 0, "cpu")
    if not fast:
        trainer.fast = None
    return trainer


def _trainer(overrides: dict, fast: bool) -> PPOTrainer:
    return _build("ppo", overrides, fast)


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


# DQN: the TD loss's gradient in closed form (`FastDQNUpdate`) against autograd on `dqn_minibatch_loss`
DQN = {"budget.env_steps": 4096, "hparams.learning_starts": 256, "hparams.train_freq": 128,
       "hparams.gradient_steps": 16, "hparams.net_arch": [64, 64]}
DQN_OPTIONS = [
    pytest.param(DQN, id="double-3step-huber"),
    pytest.param({**DQN, "hparams.double_q": False, "hparams.n_step": 1, "hparams.loss": "mse",
                  "hparams.activation": "tanh", "hparams.max_grad_norm": None}, id="plain-mse-tanh"),
    pytest.param({**DQN, "hparams.double_q": False, "hparams.n_step": 1, "hparams.munchausen": 0.9,
                  "hparams.normalize": {"obs": True}}, id="munchausen-normalized"),
]


def _dqn(overrides: dict, fast: bool):
    return _build("dqn", overrides, fast)


@pytest.mark.parametrize("overrides", DQN_OPTIONS)
def test_dqn_gradients_are_autograds(overrides):
    """On a minibatch of a real replay buffer, after some learning (TD errors on both sides of Huber's 1)."""
    trainer = _dqn(overrides, fast=True)
    assert trainer.fast is not None
    for _ in range(4):
        trainer.train_iteration()
    batch = trainer.buffer.sample(256, trainer.device)
    with torch.no_grad():  # a target network that differs from the online one
        for p in trainer.q_target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss, q_mean = dqn_minibatch_loss(trainer.q_net, trainer.q_target, batch, trainer.hp.gamma, trainer.hp)
    trainer.q_net.zero_grad(set_to_none=True)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in trainer.q_net.named_parameters()}
    fast_loss, fast_q = trainer.fast.gradients(batch, trainer.hp.gamma, trainer.hp)
    for name, p in trainer.q_net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(fast_loss, loss.detach())
    torch.testing.assert_close(fast_q, q_mean)
    if trainer.hp.loss == "huber":
        errors = (trainer.q_net(batch["obs"]).gather(-1, batch["actions"].unsqueeze(-1)).squeeze(-1)
                  - targets(trainer.hp, trainer.q_target, trainer.q_net, batch, trainer.hp.gamma)).abs()
        assert bool((errors < 1).any()) and bool((errors > 1).any())  # both pieces of Huber's gradient


@pytest.mark.parametrize("overrides", DQN_OPTIONS)
def test_dqn_updates_match_autograds_and_checkpoints_move_between_them(overrides):
    logged = _swap_midway_and_compare(_dqn(overrides, fast=True), _dqn(overrides, fast=False), "q_net")
    assert "loss/value" in logged[-1]  # (learning started)


def _swap_midway_and_compare(fast, slow, net: str) -> list[dict[str, float]]:
    """Three iterations each, then each side takes the other's checkpoint and trains one more: the
    parameters and every logged number agree within float tolerance. The logged numbers, side by side."""
    logged = []
    for _ in range(3):
        logged += [fast.train_iteration(), slow.train_iteration()]
    fast_state, slow_state = copy.deepcopy(fast.state_dict()), copy.deepcopy(slow.state_dict())
    fast.load_state_dict(slow_state)
    slow.load_state_dict(fast_state)
    logged += [fast.train_iteration(), slow.train_iteration()]
    for (name, a), b in zip(getattr(fast, net).named_parameters(), getattr(slow, net).parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for i in range(0, len(logged), 2):
        for key in (k for k in logged[i] if not k.startswith("time/")):  # time/sps: the point of the kernel
            assert logged[i][key] == pytest.approx(logged[i + 1][key], rel=1e-3, abs=1e-5), key
    return logged


def test_a_q_network_the_kernel_does_not_cover_keeps_autograd():
    trainer = _dqn(DQN, fast=True)
    trainer.q_net.q = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    assert FastDQNUpdate.why_not(trainer.q_net) == "networks other than Linear layers with tanh or ReLU"


# REINFORCE and A2C: `FastPolicyGradientUpdate` against autograd on `policy_gradient_loss`
PG_OPTIONS = [
    pytest.param("reinforce", {"budget.env_steps": 4096, "hparams.n_steps": 64}, id="reinforce-categorical"),
    pytest.param("reinforce", {"env": "Pendulum-v1", "budget.env_steps": 4096, "hparams.n_steps": 64,
                               "hparams.ent_coef": 0.01, "hparams.activation": "relu"},
                 id="reinforce-gaussian-entropy-relu"),
    pytest.param("a2c", {"budget.env_steps": 4096}, id="a2c-categorical-rmsprop"),
    pytest.param("a2c", {"budget.env_steps": 4096, "hparams.ent_coef": 0.01, "hparams.normalize_advantage": True,
                         "hparams.normalize": {"obs": True}, "hparams.max_grad_norm": None},
                 id="a2c-entropy-normalized"),
]
_pg = _build


@pytest.mark.parametrize(("algo", "overrides"), PG_OPTIONS)
def test_policy_gradient_gradients_are_autograds(algo, overrides):
    trainer = _pg(algo, overrides, fast=True)
    assert trainer.fast is not None
    trainer.train_iteration()
    rollout, _ = trainer.collect(trainer.actor, trainer.hp.n_envs, 16)
    generator = torch.Generator().manual_seed(1)
    obs = trainer.as_tensor(rollout.obs).flatten(0, 1)
    n = obs.shape[0]
    batch = PolicyGradientBatch(obs, trainer.as_tensor(rollout.actions).flatten(0, 1),
                                torch.randn(n, generator=generator), torch.randn(n, generator=generator))
    hp = trainer.hp
    loss, expected_terms = policy_gradient_loss(trainer.ac, batch, hp.vf_coef, hp.ent_coef, hp.normalize_advantage)
    trainer.ac.zero_grad(set_to_none=True)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in trainer.ac.named_parameters()}
    terms = trainer.fast.gradients(batch, hp.vf_coef, hp.ent_coef, hp.normalize_advantage)
    for name, p in trainer.ac.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    for key, value in expected_terms.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize(("algo", "overrides"), PG_OPTIONS)
def test_policy_gradient_updates_match_autograds_and_checkpoints_move_between_them(algo, overrides):
    _swap_midway_and_compare(_pg(algo, overrides, fast=True), _pg(algo, overrides, fast=False), "ac")
