"""PPO's adaptive KL penalty (Schulman et al. 2017, section 4): the beta update, the loss, and a trainer
that adapts beta to the KL its updates reach."""

from __future__ import annotations

import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.ppo import adaptive_kl_coef, kl_penalty_surrogate_loss
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


@pytest.mark.parametrize(("kl", "expected"), [(0.001, 0.5), (0.0066, 0.5), (0.0067, 1.0), (0.01, 1.0),
                                              (0.015, 1.0), (0.0151, 2.0), (0.5, 2.0)])
def test_beta_halves_and_doubles_around_the_target(kl, expected):
    assert adaptive_kl_coef(1.0, kl, 0.01) == expected


def test_kl_penalty_loss_by_hand():
    ratio = torch.tensor([1.0, 1.5, 0.5])
    adv = torch.tensor([1.0, 2.0, -2.0])
    kl = torch.tensor([0.0, 0.2, 0.4])
    # -(1 + 3 - 1) / 3 + 2 * 0.2 = -1 + 0.4
    assert float(kl_penalty_surrogate_loss(ratio, adv, kl, beta=2.0)) == pytest.approx(-0.6)


def test_trainer_adapts_beta_to_the_kl_it_reached():
    spec = load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {"hparams.loss": "kl_penalty", "hparams.kl_target": 0.01,
                                                        "budget.env_steps": 8192})
    trainer = registry.get("ppo").trainer(spec, 0, "cpu")
    previous = trainer.kl_coef
    while not trainer.done:
        logged = trainer.train_iteration()
        assert logged["ppo/kl_coef"] == previous  # the beta this update used
        assert trainer.kl_coef == adaptive_kl_coef(previous, logged["ppo/kl"], 0.01)
        previous = trainer.kl_coef
    assert "ppo/clip_fraction" in logged
