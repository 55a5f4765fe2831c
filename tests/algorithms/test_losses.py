"""Each update's loss is written once: a trainer calls it with its networks on one seed's minibatch, a batched
group with its stacked networks on every seed's minibatch at once (a leading seed axis). Here the stacked loss
of three seeds equals each seed's own loss on its own data, value and gradient; and what a batched group
declares it covers."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.batched import BatchedGroup, BatchedPPO
from labfleet.algorithms.rl.ddpg import ddpg_actor_loss, ddpg_critic_loss
from labfleet.algorithms.rl.dqn import dqn_minibatch_loss
from labfleet.algorithms.rl.ppo import PPOCoefficients, PPOHParams, PPOMinibatch, ppo_minibatch_loss
from labfleet.algorithms.rl.reinforce import PolicyGradientBatch, policy_gradient_loss
from labfleet.algorithms.seedgroup import build_group, group_class
from labfleet.algorithms.seedstack import SeedStack
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

SEEDS = (0, 1, 2)
B = 32


def trainers(algorithm: str, spec: str, overrides: dict | None = None) -> list:
    loaded = load_spec(EXPERIMENTS / spec, overrides or {})
    return [registry.get(algorithm).trainer(loaded, seed, "cpu") for seed in SEEDS]


def group_of(members: list):
    group = build_group(members[0].spec.algorithm, dict(zip(SEEDS, members, strict=True)))
    assert isinstance(group, BatchedGroup)
    return group


def assert_stacked_equals_each(group, parts: list, loss_of_one, loss_of_all, coefficients: torch.Tensor) -> None:
    """`loss_of_one(i, member)` is seed i's loss alone on its own networks; `loss_of_all()` every seed's at
    once on the group's stacked networks. Values, and the gradients of the networks in `parts`, agree to
    float32 rounding."""
    alone = []
    for i, seed in enumerate(SEEDS):
        member = group.members[seed]
        for name in parts:
            getattr(member, name).zero_grad()
        loss = loss_of_one(i, member)
        loss.backward()
        alone.append((loss.detach(), [{n: p.grad.clone() for n, p in getattr(member, name).named_parameters()
                                       if p.grad is not None} for name in parts]))
    for part in group.parts:
        part.stack.zero_grad()
    losses = loss_of_all()
    assert losses.shape == (len(SEEDS),)
    (losses * coefficients).sum().backward()  # each seed's gradient is its own loss's
    for i, (loss, grads) in enumerate(alone):
        torch.testing.assert_close(losses[i].detach(), loss, rtol=1e-5, atol=1e-6)
        for k, part_grads in enumerate(grads):
            stack = group.parts[k].stack
            for name, grad in part_grads.items():
                torch.testing.assert_close(stack.params[name].grad[i] / coefficients[i], grad, rtol=1e-4, atol=1e-6,
                                           msg=f"seed {i}: {parts[k]}.{name}")


WEIGHTS = torch.tensor([1.0, 2.0, 0.5])


def rand_batch(obs_dim: int, actions: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    n = len(SEEDS)
    return {"obs": torch.randn(n, B, obs_dim, generator=generator), "actions": actions,
            "next_obs": torch.randn(n, B, obs_dim, generator=generator),
            "rewards": torch.randn(n, B, generator=generator),
            "terminated": torch.rand(n, B, generator=generator) < 0.1}


@pytest.mark.parametrize("env,loss", [("CartPole-v1", "clip"), ("CartPole-v1", "kl_penalty"),
                                      ("Pendulum-v1", "kl_penalty")])
def test_ppos_loss_for_stacked_seeds_is_each_seeds_own(env, loss):
    overrides = {"env": env, "hparams.loss": loss, "hparams.clip_range_vf": 0.2}
    group = group_of(trainers("ppo", "cartpole_ppo.yaml", overrides))
    g = torch.Generator().manual_seed(0)
    n, dim = len(SEEDS), group.members[0].observation_space.shape[0]
    actions = (torch.randint(0, 2, (n, B), generator=g) if env == "CartPole-v1"
               else torch.randn(n, B, 1, generator=g))
    batch = PPOMinibatch(torch.randn(n, B, dim, generator=g), actions, -torch.rand(n, B, generator=g),
                         torch.randn(n, B, generator=g), torch.randn(n, B, generator=g), torch.randn(n, B, generator=g))
    coef = PPOCoefficients(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.5, 0.4, 1.0]),
                           torch.tensor([0.0, 0.01, 0.1]))
    olds = [trainers("ppo", "cartpole_ppo.yaml", {"env": env})[0].ac for _ in SEEDS]  # some other pi_old
    old_params = SeedStack(olds).params
    hp = group.hp

    def one(i, member):
        seed_batch = PPOMinibatch(*(t[i] for t in batch))
        return ppo_minibatch_loss(member.ac, olds[i], seed_batch, PPOCoefficients(*(float(c[i]) for c in coef)),
                                  hp)[0]

    def all_():
        return ppo_minibatch_loss(group._evaluate, partial(group._evaluate, params=old_params), batch, coef, hp)[0]

    assert_stacked_equals_each(group, ["ac"], one, all_, WEIGHTS)


@pytest.mark.parametrize("normalize", [False, True])
def test_the_policy_gradient_loss_for_stacked_seeds_is_each_seeds_own(normalize):
    group = group_of(trainers("a2c", "cartpole_a2c.yaml"))
    g = torch.Generator().manual_seed(1)
    n = len(SEEDS)
    batch = PolicyGradientBatch(torch.randn(n, B, 4, generator=g), torch.randint(0, 2, (n, B), generator=g),
                                torch.randn(n, B, generator=g), torch.randn(n, B, generator=g))
    vf, ent = torch.tensor([0.5, 0.25, 1.0]), torch.tensor([0.0, 0.01, 0.1])

    def one(i, member):
        return policy_gradient_loss(member.ac, PolicyGradientBatch(*(t[i] for t in batch)), float(vf[i]),
                                    float(ent[i]), normalize)[0]

    def all_():
        return policy_gradient_loss(group._evaluate, batch, vf, ent, normalize)[0]

    assert_stacked_equals_each(group, ["ac"], one, all_, WEIGHTS)


@pytest.mark.parametrize("options", [{}, {"hparams.double_q": True, "hparams.loss": "mse", "hparams.n_step": 3},
                                     {"hparams.munchausen": 0.9, "hparams.n_step": 1, "hparams.double_q": False}])
def test_dqns_loss_for_stacked_seeds_is_each_seeds_own(options):
    members = trainers("dqn", "cartpole_dqn.yaml", options)
    for m in members:  # a target network apart from the online one
        for p in m.q_target.parameters():
            p.data.add_(0.1)
    group = group_of(members)
    g = torch.Generator().manual_seed(2)
    batch = rand_batch(4, torch.randint(0, 2, (len(SEEDS), B), generator=g), g)
    if options.get("hparams.n_step", 1) > 1:
        batch["discounts"] = torch.rand(len(SEEDS), B, generator=g)
    gamma = torch.tensor([0.99, 0.9, 0.5])
    hp = group.hp

    def one(i, member):
        return dqn_minibatch_loss(member.q_net, member.q_target, {k: v[i] for k, v in batch.items()},
                                  float(gamma[i]), hp)[0]

    def all_():
        return dqn_minibatch_loss(group._q, partial(group._q, params=group.target), batch, gamma.unsqueeze(1), hp)[0]

    assert_stacked_equals_each(group, ["q_net"], one, all_, WEIGHTS)


def test_ddpgs_losses_for_stacked_seeds_are_each_seeds_own():
    members = trainers("ddpg", "pendulum_ddpg.yaml")
    for m in members:
        for p in [*m.actor_target.parameters(), *m.critic_target.parameters()]:
            p.data.add_(0.05)
    group = group_of(members)
    g = torch.Generator().manual_seed(3)
    batch = rand_batch(3, torch.rand(len(SEEDS), B, 1, generator=g) * 4 - 2, g)
    gamma = torch.tensor([0.99, 0.9, 0.5])

    def critic_one(i, member):
        return ddpg_critic_loss(member.critic, member.actor_target, member.critic_target,
                                {k: v[i] for k, v in batch.items()}, float(gamma[i]))[0]

    def critic_all():
        return ddpg_critic_loss(group._critic, partial(group._actor, params=group.actor_target),
                                partial(group._critic, params=group.critic_target), batch, gamma.unsqueeze(1))[0]

    assert_stacked_equals_each(group, ["actor", "critic"], critic_one, critic_all, WEIGHTS)

    def actor_one(i, member):
        return ddpg_actor_loss(member.actor, member.critic, {k: v[i] for k, v in batch.items()})

    def actor_all():
        return ddpg_actor_loss(group._actor, group._critic, batch)

    assert_stacked_equals_each(group, ["actor", "critic"], actor_one, actor_all, WEIGHTS)


@pytest.mark.parametrize("algorithm", [name for name in registry.names() if group_class(name) is not None])
def test_a_batched_group_declares_every_hyperparameter_once(algorithm):
    info = registry.get(algorithm)
    per_seed_names, shared = set(info.per_seed_hparams), set(info.group_hparams)
    assert not per_seed_names & shared
    assert per_seed_names | shared == set(info.hparams.model_fields), "declare each hyperparameter on the info"


def test_an_option_the_batched_group_does_not_know_sends_the_seeds_in_turn():
    class Extended(PPOHParams):
        new_option: float = 0.0

    assert BatchedPPO._honours(Extended())
    assert not BatchedPPO._honours(Extended(new_option=1.0))
    assert BatchedPPO._honours(PPOHParams(clip_range_vf=0.3, target_kl=0.01))
