"""The shared trainer suite: every registered algorithm passes the same checks (STYLE 5).

A newly registered algorithm joins automatically; it must ship a spec in experiments/ that this suite
shrinks to a few iterations.
"""

from __future__ import annotations

import pytest

from labfleet import testing
from labfleet.algorithms import registry
from labfleet.spec.loading import load_spec
from tests.conftest import shipped_spec_for

ALGORITHMS = registry.names()
# the generative trainers' contract checks take 5-35 s each: the slow lane runs them
CONTRACT = [pytest.param(name, marks=pytest.mark.slow) if registry.get(name).kind == "generative" else name
            for name in ALGORITHMS]
# Keep each algorithm to a few iterations: small batches, a small budget, small networks (the GAN's and the
# VAE's `hidden` and `d_hidden` too: grid_gan.yaml's 4 x 400 generator costs seconds an evaluation).
SHRINK = {"n_envs": 2, "n_steps": 16, "learning_starts": 16, "batch_size": 16, "train_freq": 8,
          "gradient_steps": 2, "buffer_size": 1000, "net_arch": [32, 32], "hidden": [32, 32],
          "d_hidden": [32, 32]}


def tiny_spec(algorithm: str, extra: dict | None = None):
    spec = load_spec(shipped_spec_for(algorithm))
    hparams = {k: v for k, v in SHRINK.items() if k in spec.hparams}
    overrides = {f"hparams.{k}": v for k, v in hparams.items()}
    if spec.budget.unit == "env_steps":
        overrides["budget.env_steps"] = 2000
    else:
        overrides[f"budget.{spec.budget.unit}"] = 20
    overrides["eval.episodes"] = 2
    return load_spec(shipped_spec_for(algorithm), {**overrides, **(extra or {})})


def build(algorithm: str, seed: int = 0):
    spec = tiny_spec(algorithm)
    return registry.get(algorithm).trainer(spec, seed, "cpu")


# Variants the algorithm-by-algorithm runs above do not reach: running normalisation (its statistics are
# trainer state) for every deep learner, wrappers, and EnvPool. (The CNN path: tests/algorithms/test_atari.py.)
VARIANTS = {
    **{f"{name}+normalize": (name, {"hparams.normalize": True})
       for name in ("ppo", "a2c", "reinforce", "dqn", "ddpg")},
    "dqn+one_step": ("dqn", {"hparams.n_step": 1}),  # (the shipped spec uses 3-step targets)
    # eval.select_best: the best network so far is trainer state (tests/algorithms/test_select_best.py); the
    # shipped DQN spec selects, so its variant is the one without
    "dqn+no_select": ("dqn", {"eval.select_best": False}),
    "ppo+select_best": ("ppo", {"eval.select_best": True}),
    "ddpg+select_best": ("ddpg", {"eval.select_best": True}),
    # EnvPool's environments (rollout/envpool_backend.py): a discrete and a continuous action space
    "ppo+envpool": ("ppo", {"env_backend": "envpool"}),
    "ddpg+envpool": ("ddpg", {"env_backend": "envpool"}),
    "ppo+wrappers": ("ppo", {"env_wrappers": [{"type": "TimeLimit", "kwargs": {"max_episode_steps": 30}},
                                              {"type": "ClipReward", "kwargs": {"max_reward": 0.5},
                                               "train_only": True}]}),
}


def build_variant(variant: str, seed: int = 0):
    algorithm, overrides = VARIANTS[variant]
    return registry.get(algorithm).trainer(tiny_spec(algorithm, overrides), seed, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_keep_the_contract(variant):
    testing.check_checkpoint_round_trip(lambda seed: build_variant(variant, seed))
    testing.check_exact_resume(lambda seed: build_variant(variant, seed))
    testing.check_determinism(lambda seed: build_variant(variant, seed), True)
    testing.check_evaluate_leaves_training_untouched(lambda seed: build_variant(variant, seed))


def test_registry_is_not_empty():
    assert "reinforce" in ALGORITHMS


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_checkpoint_round_trip_gives_identical_next_actions(algorithm):
    testing.check_checkpoint_round_trip(lambda seed: build(algorithm, seed))


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_a_restored_trainer_goes_on_exactly(algorithm):
    trainer = build(algorithm)
    testing.check_exact_resume(lambda seed: build(algorithm, seed))
    trainer.train_iteration()
    restored = build(algorithm)
    restored.restore_bytes(trainer.checkpoint_bytes())
    assert restored.resume_exact, "the shipped environments can all be saved: the resume must be exact"


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_same_seed_same_metrics_other_seed_differs(algorithm):
    testing.check_determinism(lambda seed: build(algorithm, seed), registry.get(algorithm).seed_dependent)


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_trainer_pickles_for_ray(algorithm):
    testing.check_pickling(lambda seed: build(algorithm, seed))


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_budget_is_respected_and_metric_names_are_shared(algorithm):
    from labfleet import metrics as M

    metric = registry.get(algorithm).primary_metric_for(tiny_spec(algorithm).dataset)
    names = testing.check_budget(lambda seed: build(algorithm, seed), metric)
    known = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str)}
    assert names <= known, f"metric names not defined in labfleet.metrics: {names - known}"


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_evaluate_leaves_training_untouched(algorithm):
    testing.check_evaluate_leaves_training_untouched(lambda seed: build(algorithm, seed))


@pytest.mark.parametrize("algorithm", CONTRACT)
def test_seeds_trained_together_keep_the_contract(algorithm):
    """`resources.seeds_per_actor`: two seeds in one group (batched where the algorithm has a batched form),
    deterministic, and each seed's checkpoint is an ordinary trainer's: it restores into a trainer built
    alone, which acts as the group's member does."""
    import numpy as np

    from labfleet.algorithms.seedgroup import build_group, group_class

    def group():
        return build_group(algorithm, {seed: build(algorithm, seed) for seed in (0, 1)})

    def run(g) -> list:
        logs = [{seed: testing.without_timing(logged) for seed, logged in g.train_iteration().items()}
                for _ in range(2)]
        g.sync()
        return logs

    first, second = group(), group()
    assert run(first) == run(second), "the same seeds trained together twice differ"
    assert getattr(first, "batched", False) == (group_class(algorithm) is not None)
    for seed, member in first.members.items():
        alone = build(algorithm, seed)
        alone.restore_bytes(member.checkpoint_bytes())
        np.testing.assert_array_equal(alone.probe(), member.probe())
        assert alone.progress == member.progress and alone.metric_step == member.metric_step > 0
    first.close()
    second.close()


def test_a_users_trainer_passes_the_public_checks(monkeypatch):
    """`labfleet.testing.check_trainer` on a Trainer subclass outside the package (experiments/custom/)."""
    from tests.conftest import EXPERIMENTS

    monkeypatch.syspath_prepend(str(EXPERIMENTS / "custom"))
    from bandit_trainer import EpsilonGreedyBandit

    spec = load_spec(EXPERIMENTS / "custom" / "bandit_trainer.yaml", {"budget.iterations": 1000})
    testing.check_trainer(lambda seed: EpsilonGreedyBandit(spec, seed, "cpu"), primary_metric="eval/regret")
