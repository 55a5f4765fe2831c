"""Running observation and reward normalisation (issue 13 section 3): exact statistics, exact discounted
returns, clipping, the checkpoint, frozen statistics in evaluation, and what the learners see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet.algorithms import registry
from labfleet.algorithms.rl.normalize import ObservationNormalizer, RewardScaler, RunningMeanStd
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS


def test_running_statistics_merge_batches_exactly():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 3))
    rms = RunningMeanStd((3,))
    for part in np.split(data, [7, 300, 301, 640]):
        rms.update(torch.from_numpy(part))
    # The 1e-4 prior count (mean 0, var 1) is all that separates it from the statistics of the whole set.
    prior = 1e-4
    mean = data.sum(0) / (len(data) + prior)
    var = (data.var(0) * len(data) + prior * 1.0 + (data.mean(0) ** 2) * prior * len(data) / (len(data) + prior)) \
        / (len(data) + prior)
    np.testing.assert_allclose(rms.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(rms.var.numpy(), var, rtol=1e-12)
    assert float(rms.count) == pytest.approx(len(data) + prior)


def test_observations_are_standardised_and_clipped():
    norm = ObservationNormalizer((2,), clip=2.0, epsilon=0.0)
    norm.rms.mean.copy_(torch.tensor([1.0, -1.0], dtype=torch.float64))
    norm.rms.var.copy_(torch.tensor([4.0, 0.25], dtype=torch.float64))
    out = norm(torch.tensor([[3.0, -1.25], [100.0, 0.0]]))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), [[1.0, -0.5], [2.0, 2.0]])


def test_rewards_scale_by_the_std_of_each_envs_discounted_return():
    """gamma 0.5; env 0's episode ends at t = 1, so its return restarts at t = 2."""
    scaler = RewardScaler(gamma=0.5, clip=10.0, epsilon=0.0)
    rewards = np.ones((3, 2))
    terminated = np.array([[False, False], [True, False], [False, False]])
    scaler.observe(rewards, terminated, np.zeros_like(terminated))
    seen = np.array([1.0, 1.0, 1.5, 1.5, 1.0, 1.75])
    np.testing.assert_allclose(scaler.returns, [1.0, 1.75])
    prior, n = 1e-4, len(seen)
    var = (seen.var() * n + prior + seen.mean() ** 2 * prior * n / (n + prior)) / (n + prior)
    assert float(scaler.rms.var) == pytest.approx(var, rel=1e-12)
    scaled = scaler.scale(torch.tensor([2.0, -1e6]))
    np.testing.assert_allclose(scaled.numpy(), [2.0 / np.sqrt(var), -10.0], rtol=1e-6)
    # Rewards are scaled, never shifted: a zero stays zero.
    assert float(scaler.scale(torch.tensor([0.0]))[0]) == 0.0


@pytest.mark.parametrize("algorithm", ["ppo", "dqn"])
def test_learners_update_the_statistics_from_raw_rollouts_and_evaluation_leaves_them(algorithm):
    spec = load_spec(EXPERIMENTS / f"cartpole_{algorithm}.yaml",
                     {"hparams.normalize": True, "budget.env_steps": 5000, "eval.episodes": 2,
                      **({"hparams.learning_starts": 64} if algorithm == "dqn" else {})})
    trainer = registry.get(algorithm).trainer(spec, 0, "cpu")
    assert trainer.obs_normalizer is not None and trainer.reward_scaler is not None
    for _ in range(3):
        trainer.train_iteration()
    count = float(trainer.obs_normalizer.rms.count)
    assert count == pytest.approx(trainer.env_steps + 1e-4), "every collected observation counts once"
    assert float(trainer.reward_scaler.rms.count) == pytest.approx(trainer.env_steps + 1e-4)
    before = {k: v.clone() for k, v in trainer.obs_normalizer.state_dict().items()}
    trainer.evaluate()
    for key, value in trainer.obs_normalizer.state_dict().items():
        assert torch.equal(value, before[key]), "evaluation must not move the statistics"
    # The networks read the trainer's one normaliser (targets included), not copies of it.
    nets = [trainer.ac] if algorithm == "ppo" else [trainer.q_net, trainer.q_target]
    for net in nets:
        assert any(m is trainer.obs_normalizer for m in net.modules())
    trainer.close()


def test_statistics_survive_a_checkpoint():
    spec = load_spec(EXPERIMENTS / "cartpole_ppo.yaml", {"hparams.normalize": True, "budget.env_steps": 5000})
    build = registry.get("ppo").trainer
    trainer = build(spec, 0, "cpu")
    for _ in range(2):
        trainer.train_iteration()
    restored = build(spec, 0, "cpu")
    restored.restore_bytes(trainer.checkpoint_bytes())
    for (key, a), b in zip(trainer.obs_normalizer.state_dict().items(),
                           restored.obs_normalizer.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert torch.equal(trainer.reward_scaler.rms.var, restored.reward_scaler.rms.var)
    np.testing.assert_array_equal(trainer.probe(), restored.probe())
    trainer.close()
    restored.close()


def test_normalize_true_turns_on_both_halves():
    from labfleet.algorithms.rl.ppo import PPOHParams

    both = PPOHParams.model_validate({"normalize": True}).normalize
    assert both.obs and both.reward and both.clip_obs == 10.0
    assert not PPOHParams.model_validate({}).normalize.obs
