"""Your own torch module inside a built-in algorithm (`hparams.encoder: package.module:Class`): PPO, DQN and
DDPG put their heads on its features, train, checkpoint and restore; validation imports it, never calls it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.networks import ObservationEncoder
from labfleet.errors import SpecError
from labfleet.spec.loading import resolve_spec_data
from labfleet.testing import check_checkpoint_round_trip

ENCODER = '''
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, observation_space, hidden=32):
        super().__init__()
        self.features_dim = hidden
        self.net = nn.Sequential(nn.Linear(observation_space.shape[0], hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, x):
        return self.net(x)


class NoDim(nn.Module):
    def __init__(self, observation_space, hidden=32):
        super().__init__()

    def forward(self, x):
        return x
'''

CASES = {
    "ppo": ("CartPole-v1", {"n_envs": 2, "n_steps": 32, "batch_size": 32, "n_epochs": 2}),
    "dqn": ("CartPole-v1", {"learning_starts": 32, "batch_size": 16, "train_freq": 1, "learning_rate": 1e-3,
                            "target_update_interval": 64}),
    "ddpg": ("Pendulum-v1", {"learning_starts": 64, "batch_size": 32}),
}


@pytest.fixture
def encoder_dir(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "myencoders.py").write_text(ENCODER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _spec(algorithm: str, directory: Path, encoder: str = "myencoders:TwoLayer"):
    env, hparams = CASES[algorithm]
    data = {"name": "enc", "algorithm": algorithm, "env": env, "seeds": [0], "budget": {"env_steps": 512},
            "eval": {"episodes": 2}, "hparams": {**hparams, "encoder": encoder, "encoder_kwargs": {"hidden": 16}}}
    return resolve_spec_data(data, str(directory / "spec.yaml"))


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_a_module_of_ones_own_is_the_encoder_of_a_builtin(encoder_dir: Path, algorithm: str):
    spec = _spec(algorithm, encoder_dir)
    cls = registry.get(algorithm).trainer
    trainer = cls(spec, 0, "cpu")
    encoders = [e for m in vars(trainer).values() if isinstance(m, torch.nn.Module) for e in m.modules()
                if isinstance(e, ObservationEncoder)]
    assert encoders and all(type(e.custom).__name__ == "TwoLayer" and e.dim == 16 for e in encoders)
    metrics = trainer.train_iteration()
    assert all(np.isfinite(v) for v in metrics.values())
    check_checkpoint_round_trip(lambda seed: cls(spec, seed, "cpu"))


def test_an_encoder_that_is_not_a_module_is_refused_without_being_called(encoder_dir: Path):
    with pytest.raises(SpecError, match="must name a torch.nn.Module subclass"):
        _spec("ppo", encoder_dir, "os:getcwd")
    with pytest.raises(SpecError, match="cannot import module"):
        _spec("ppo", encoder_dir, "no_such_module_xyz:Thing")
    spec = _spec("ppo", encoder_dir, "myencoders:NoDim")
    with pytest.raises(TypeError, match="must set `features_dim`"):
        registry.get("ppo").trainer(spec, 0, "cpu")
