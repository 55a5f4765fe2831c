"""Image observations (issue 13 sections 3-4): the Nature-DQN CNN trains PPO and DQN for a thousand
steps on real Atari games through the shipped specs' preprocessing wrappers (labfleet[atari]: ale-py ships
the ROMs; the README's test command installs it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.algorithms.rl.networks import NatureCNN
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

# Sized to check the wiring, not to learn: 1024 steps are 4 PPO updates (4 epochs of 4 minibatches each) and
# 128 DQN gradient steps on one torch thread (3072 steps took 28-31 s a spec, most of the file's time).
BUDGET = 1024
SHRINK = {
    "breakout_ppo.yaml": {"hparams.n_envs": 2, "hparams.n_steps": 128, "hparams.batch_size": 64},
    "pong_dqn.yaml": {"hparams.learning_starts": 512, "hparams.buffer_size": 4096, "hparams.batch_size": 32},
}


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", sorted(SHRINK))
def test_the_cnn_trains_on_atari_frames(spec_name):
    path = EXPERIMENTS / "atari" / spec_name
    # An untrained greedy policy may never serve again in Breakout: cut evaluation games at 1000 steps.
    wrappers = [*yaml.safe_load(path.read_text())["env_wrappers"],
                {"type": "TimeLimit", "kwargs": {"max_episode_steps": 1000}}]
    spec = load_spec(path, {**SHRINK[spec_name], "budget.env_steps": BUDGET, "eval.episodes": 1,
                            "env_wrappers": wrappers})
    trainer = registry.get(spec.algorithm).trainer(spec, 0, "cpu")
    assert trainer.observation_space.shape == (4, 84, 84) and trainer.observation_space.dtype == np.uint8
    net = trainer.ac if spec.algorithm == "ppo" else trainer.q_net
    cnns = [m for m in net.modules() if isinstance(m, NatureCNN)]
    assert len(cnns) == 1, "one CNN, shared by the heads"
    first_conv = cnns[0].convs[0].weight.detach().clone()
    losses = []
    while not trainer.done:
        metrics = trainer.train_iteration()
        if M.LOSS_VALUE in metrics:
            losses.append(metrics[M.LOSS_VALUE])
    assert trainer.env_steps >= BUDGET and losses and np.isfinite(losses).all()
    assert not torch.equal(first_conv, cnns[0].convs[0].weight), "the convolutions learn"
    evaluation = trainer.evaluate()  # the whole game, with the training-only reward clipping left out
    assert np.isfinite(evaluation[M.EVAL_RETURN_MEAN])
    if spec_name == "pong_dqn.yaml":
        assert -21 <= evaluation[M.EVAL_RETURN_MEAN] <= 21
    trainer.close()
