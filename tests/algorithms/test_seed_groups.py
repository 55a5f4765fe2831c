"""Seeds trained together (`resources.seeds_per_actor`): each batched seed learns as its unbatched self does,
its checkpoint restores into an unbatched trainer, and one seed's failure is that seed's alone."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.algorithms.rl.batched import BatchedGroup, BatchedPPO
from labfleet.algorithms.seedgroup import SequentialGroup, build_group
from labfleet.orchestration.trial import TrialWorker, TrialWorkerGroup
from labfleet.orchestration.wire import SeedChunk, SeedFailed
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

SEEDS = [0, 1, 2]
COMPARED = (M.TRAIN_EPISODE_RETURN, M.LOSS_POLICY, M.LOSS_VALUE, M.LOSS_ENTROPY, M.PPO_APPROX_KL,
            M.PPO_CLIP_FRACTION, M.GRAD_NORM, M.LEARNING_RATE, M.PPO_KL_COEF, M.Q_MEAN, M.DQN_EPSILON,
            M.DDPG_Q_MEAN)

CASES = {
    "cartpole": {},
    "a2c": {"algorithm": "a2c", "spec": "cartpole_a2c.yaml", "budget.env_steps": 1200},
    "a2c-gae-normalized": {"algorithm": "a2c", "spec": "cartpole_a2c.yaml", "budget.env_steps": 1200,
                           "hparams.gae_lambda": 0.9, "hparams.normalize_advantage": True,
                           "hparams.normalize": True},
    "reinforce": {"algorithm": "reinforce", "spec": "cartpole_reinforce.yaml"},
    "dqn": {"algorithm": "dqn", "spec": "cartpole_dqn.yaml", "budget.env_steps": 2000, "hparams.gradient_steps": 32},
    "dqn-double-normalized-polyak": {"algorithm": "dqn", "spec": "cartpole_dqn.yaml", "budget.env_steps": 2000,
                                     "hparams.gradient_steps": 32, "hparams.double_q": True, "hparams.normalize": True,
                                     "hparams.target_update_interval": 250, "hparams.tau": 0.5},
    # (the squared error's larger gradients part the runs sooner: all of these together parted one seed at
    # the 5th iteration; the squared error alone, one at the 11th)
    "dqn-mse": {"algorithm": "dqn", "spec": "cartpole_dqn.yaml", "budget.env_steps": 2000, "hparams.loss": "mse",
                "hparams.gradient_steps": 32},
    "dqn-n-step": {"algorithm": "dqn", "spec": "cartpole_dqn.yaml", "budget.env_steps": 2000,
                   "hparams.gradient_steps": 32, "hparams.n_step": 3, "hparams.n_envs": 2},
    "dqn-one-step": {"algorithm": "dqn", "spec": "cartpole_dqn.yaml", "budget.env_steps": 2000,
                     "hparams.gradient_steps": 32, "hparams.n_step": 1},
    "dqn-munchausen": {"algorithm": "dqn", "spec": "cartpole_dqn.yaml", "budget.env_steps": 2000,
                       "hparams.gradient_steps": 32, "hparams.double_q": False, "hparams.munchausen": 0.9,
                       "hparams.n_step": 1},
    # DDPG: after some tens of Adam steps of the 400x300 ReLU nets the runs part, as for Pendulum's PPO above,
    # and where depends on the CPU's rounding: on one machine after about 60 (metrics to 1e-6 up to there,
    # 1e-2 soon after); on a machine with AVX-512 the weights were 1e-6 apart after 20 steps, up to 4e-5
    # after 28, 6e-4 after 44 and 1e-3 after 52. Hence 20 here (4 phases of 4, from step 200 to 264).
    "ddpg": {"algorithm": "ddpg", "spec": "pendulum_ddpg.yaml", "budget.env_steps": 264,
             "hparams.learning_starts": 200, "hparams.train_freq": 16, "hparams.gradient_steps": 4},
    "ddpg-ou-normalized": {"algorithm": "ddpg", "spec": "pendulum_ddpg.yaml", "budget.env_steps": 264,
                           "hparams.learning_starts": 200, "hparams.train_freq": 16, "hparams.gradient_steps": 4,
                           "hparams.noise_type": "ornstein_uhlenbeck", "hparams.normalize": True},
    # early stops at different epochs per seed, a learning-rate schedule, running normalisation, value clipping
    # (6 iterations: on the AVX-512 machine above, one seed of three parted at the 9th)
    "target-kl-normalized": {"budget.env_steps": 1536, "hparams.target_kl": 0.002, "hparams.learning_rate": "lin_0.001",
                             "hparams.normalize": True, "hparams.clip_range_vf": 0.2},
    "kl-penalty": {"hparams.loss": "kl_penalty", "hparams.kl_target": 0.003},
    "pendulum-gaussian": {"env": "Pendulum-v1", "hparams.n_envs": 4, "hparams.n_steps": 256,
                          "hparams.batch_size": 128, "hparams.normalize": True, "budget.env_steps": 1024},
}


def spec_for(case: str):
    overrides = dict(CASES[case])
    overrides.pop("algorithm", None)
    return ppo_spec(overrides, spec=overrides.pop("spec", "cartpole_ppo.yaml"))


def ppo_spec(overrides: dict, steps: int = 3072, spec: str = "cartpole_ppo.yaml"):
    # Short runs: a batched matmul rounds differently from an unbatched one (about 1e-7), and once a sampled
    # action sits that close to a tie (the Gumbel-max of one step), the two rollouts part ways and the runs
    # drift apart as any two seeds would. Measured: with normalize on, one seed of three parted at the 15th
    # iteration; the first three iterations agree to 1e-6 in every case here.
    return load_spec(EXPERIMENTS / spec, {"budget.env_steps": steps, "eval": {"episodes": 3}, **overrides})


def train(trainer_or_group, iterations: int | None = None) -> list:
    logs = []
    if isinstance(trainer_or_group, dict):  # a group: {seed: [logged, ...]}
        group = trainer_or_group["group"]
        out: dict[int, list] = {seed: [] for seed in group.members}
        count = 0
        while group.live() and (iterations is None or count < iterations):
            for seed, logged in group.train_iteration().items():
                out[seed].append(logged)
            count += 1
        group.sync()
        return out  # type: ignore[return-value]
    count = 0
    while not trainer_or_group.done and (iterations is None or count < iterations):
        logs.append(trainer_or_group.train_iteration())
        count += 1
    return logs


def assert_agree(alone: list[dict], together: list[dict], rtol: float = 2e-3) -> None:
    assert len(alone) == len(together)
    for step, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert set(a) == set(b)
        for key in COMPARED:
            if key in a:
                # the clip fraction counts samples past a threshold: a rounding difference can move one
                # sample of a minibatch across it (1 / 256 of one minibatch's fraction)
                tolerance = 0.01 if key == M.PPO_CLIP_FRACTION else 1e-5
                assert b[key] == pytest.approx(a[key], rel=rtol, abs=tolerance), f"{key} at iteration {step}"


@pytest.mark.parametrize("case", list(CASES))
def test_batched_seeds_agree_with_each_seed_trained_alone(case):
    spec = spec_for(case)
    info = registry.get(spec.algorithm)
    alone = {seed: info.trainer(spec, seed, "cpu") for seed in SEEDS}
    alone_logs = {seed: train(trainer) for seed, trainer in alone.items()}
    group = build_group(spec.algorithm, {seed: info.trainer(spec, seed, "cpu") for seed in SEEDS})
    assert isinstance(group, BatchedGroup)
    together = train({"group": group})
    for seed in SEEDS:
        assert_agree(alone_logs[seed], together[seed])
        a, b = alone[seed], group.members[seed]
        # Continuous actions carry the rounding into the environment (Pendulum's returns differ in the 8th
        # digit after two iterations, the 5th to 7th after three) and Adam magnifies it where a gradient is
        # near zero: measured with two torch threads, the metrics of the first two iterations agree to 1e-5,
        # the third's to 1e-2; with one thread (as in the tests and in a trial actor) the second's grad norm
        # already 1e-2 apart, hence one iteration (80 Adam steps) here. The categorical policies' weights
        # agree to 1e-6 to 2e-5 after three.
        # DQN: measured after 2000 steps of 128 Adam steps a phase, one seed of three 3e-4 apart (its
        # metrics agree to 2e-3), the others 1e-6; here 32 steps a phase.
        atol = 1e-4 if case == "pendulum-gaussian" else 1e-3 if spec.algorithm == "dqn" else 5e-5
        for (name, p), q in zip(group._module(a).named_parameters(), group._module(b).parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-3, atol=atol, msg=f"seed {seed}: {name}")
        targets = {"dqn": ("q_target",), "ddpg": ("critic", "actor_target", "critic_target")}
        for name in targets.get(spec.algorithm, ()):  # the other networks, and the target networks
            for p, q in zip(getattr(a, name).parameters(), getattr(b, name).parameters(), strict=True):
                torch.testing.assert_close(q, p, rtol=1e-3, atol=atol, msg=f"seed {seed}: {name}")
        for _, optimizer in group.PARTS:  # the same number of steps (PPO: the same early stops)
            assert getattr(a, optimizer).updates == getattr(b, optimizer).updates > 0
        assert getattr(a, "kl_coef", None) == getattr(b, "kl_coef", None)
        np.testing.assert_allclose(b.probe(), a.probe(), rtol=0, atol=atol * 10)  # argmax actions: equal
        continuous = case == "pendulum-gaussian" or spec.algorithm == "ddpg"  # (the rounding reaches the env)
        assert b.evaluate() == pytest.approx(a.evaluate(), rel=1e-2 if continuous else 1e-6)
    if case == "target-kl-normalized":  # the early stop happened, and not for every seed alike
        hp = spec.hparams
        full = hp["n_epochs"] * (hp["n_envs"] * hp["n_steps"] // hp["batch_size"]) * len(alone_logs[0])
        updates = [alone[seed].optimizer.updates for seed in SEEDS]
        assert min(updates) < full and len(set(updates)) > 1, updates


def test_a_batched_seeds_checkpoint_restores_into_an_unbatched_trainer_and_goes_on_alike():
    # 3 iterations together, then 6 more each way (with 21 more, one seed parted at the 16th on an AVX-512 CPU)
    spec = ppo_spec({}, steps=2304)
    ppo = registry.get("ppo")
    group = build_group("ppo", {seed: ppo.trainer(spec, seed, "cpu") for seed in SEEDS})
    train({"group": group}, iterations=3)
    checkpoint = group.members[1].checkpoint_bytes()
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    hp = spec.hparams
    rollout = hp["n_envs"] * hp["n_steps"]
    assert state["rl"]["env_steps"] == 3 * rollout
    assert state["optimizer"]["updates"] == 3 * hp["n_epochs"] * (rollout // hp["batch_size"])
    alone = ppo.trainer(spec, 1, "cpu")
    alone.restore_bytes(checkpoint)
    assert alone.resume_exact
    rest_alone = train(alone)
    rest_together = train({"group": group})[1]
    assert_agree(rest_alone, rest_together)
    np.testing.assert_array_equal(alone.probe(), group.members[1].probe())


def test_sequential_seeds_are_each_seed_alone_bit_for_bit():
    spec = load_spec(EXPERIMENTS / "frozenlake_qlearning.yaml", {"seeds": [3, 4], "budget.env_steps": 20000,
                                                                 "eval": {"episodes": 20, "every_steps": 5000}})
    group = TrialWorkerGroup(spec.model_dump(mode="json"), [3, 4])
    assert isinstance(group.group, SequentialGroup)
    together = group.advance(seconds=1e9).seeds
    for seed in (3, 4):
        alone = TrialWorker(spec.model_dump(mode="json"), seed).advance(seconds=1e9)
        assert together[seed].done and alone.done
        def untimed(records):
            return [(step, {k: v for k, v in values.items() if k != M.SPS})
                    for step, values in records]

        assert untimed(together[seed].records) == untimed(alone.records)
        assert together[seed].checkpoint == alone.checkpoint


def test_one_seeds_nan_fails_that_seed_alone():
    spec = ppo_spec({"seeds": SEEDS, "eval": {"episodes": 2, "every_steps": 2048}}, steps=4096)
    worker = TrialWorkerGroup(spec.model_dump(mode="json"), SEEDS)
    assert isinstance(worker.group, BatchedPPO)
    first = worker.advance(seconds=0.0).seeds  # one iteration each
    assert all(isinstance(part, SeedChunk) for part in first.values())
    with torch.no_grad():
        worker.group.stack.params["value_net.0.weight"][1].fill_(math.nan)  # seed 1's critic breaks
    parts = worker.advance(seconds=1e9).seeds
    assert "non-finite" in parts[1].error, parts[1]
    for seed in (0, 2):
        assert parts[seed].done and math.isfinite(parts[seed].final["eval/return_mean"])
        state = torch.load(io.BytesIO(parts[seed].checkpoint), weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert worker.advance(seconds=1e9).seeds == {}  # nothing left to train or report


# Trials of a sweep that differ only in hyperparameters the batched group takes per seed (`PER_SEED`) train
# batched in one actor (`sweep.share_actors`): each member with its own values, learning as it would alone.
MIXED = {
    "ppo": ("cartpole_ppo.yaml", {"budget.env_steps": 1536}, [
        {"hparams.learning_rate": "lin_0.001", "hparams.clip_range": 0.1, "hparams.gae_lambda": 0.8,
         "hparams.n_epochs": 4, "hparams.gamma": 0.98, "hparams.target_kl": 0.002, "hparams.max_grad_norm": 0.3},
        {"hparams.learning_rate": 3e-4, "hparams.clip_range": "lin_0.3", "hparams.gae_lambda": 0.95,
         "hparams.n_epochs": 10, "hparams.ent_coef": 0.01, "hparams.vf_coef": 1.0, "hparams.max_grad_norm": None},
        {"hparams.learning_rate": 0.002, "hparams.n_epochs": 6, "hparams.gamma": 0.9}]),
    "a2c": ("cartpole_a2c.yaml", {"budget.env_steps": 1200}, [
        {"hparams.learning_rate": 0.001, "hparams.gamma": 0.95, "hparams.gae_lambda": 0.9},
        {"hparams.ent_coef": 0.01, "hparams.vf_coef": 0.25, "hparams.max_grad_norm": 1.0},
        {"hparams.learning_rate": "lin_0.002"}]),
    "reinforce": ("cartpole_reinforce.yaml", {"budget.env_steps": 3072}, [
        {"hparams.gamma": 0.95}, {"hparams.learning_rate": 3e-4, "hparams.ent_coef": 0.01},
        {"hparams.vf_coef": 1.0, "hparams.max_grad_norm": None}]),
    "dqn": ("cartpole_dqn.yaml", {"budget.env_steps": 2000, "hparams.gradient_steps": 32, "hparams.n_step": 1}, [
        {"hparams.learning_rate": 1e-3, "hparams.gamma": 0.95, "hparams.target_update_interval": 250,
         "hparams.tau": 0.5},
        {"hparams.exploration_fraction": 0.5, "hparams.exploration_final_eps": 0.1},
        {"hparams.max_grad_norm": 1.0, "hparams.target_update_interval": 400}]),
    "ddpg": ("pendulum_ddpg.yaml", {"budget.env_steps": 264, "hparams.learning_starts": 200,
                                    "hparams.train_freq": 16, "hparams.gradient_steps": 4}, [
        {"hparams.learning_rate": 3e-4, "hparams.tau": 0.02}, {"hparams.gamma": 0.9, "hparams.noise_std": 0.3},
        {}]),
}


@pytest.mark.parametrize("algorithm", list(MIXED))
def test_members_with_their_own_hyperparameters_agree_with_each_alone(algorithm):
    name, common, own = MIXED[algorithm]
    specs = {key: load_spec(EXPERIMENTS / name, {"eval": {"episodes": 3}, **common, **values})
             for key, values in zip(SEEDS, own, strict=True)}
    info = registry.get(algorithm)
    alone = {key: info.trainer(spec, 7, "cpu") for key, spec in specs.items()}  # one seed, three configurations
    alone_logs = {key: train(trainer) for key, trainer in alone.items()}
    group = build_group(algorithm, {key: info.trainer(spec, 7, "cpu") for key, spec in specs.items()})
    assert isinstance(group, BatchedGroup)
    together = train({"group": group})
    atol = 1e-3 if algorithm == "dqn" else 5e-5
    for key in SEEDS:
        assert_agree(alone_logs[key], together[key])
        a, b = alone[key], group.members[key]
        for (pname, p), q in zip(group._module(a).named_parameters(), group._module(b).parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-3, atol=atol, msg=f"member {key}: {pname}")
        for _, optimizer in group.PARTS:
            assert getattr(a, optimizer).updates == getattr(b, optimizer).updates > 0
    if algorithm == "ppo":  # each ran its own number of epochs (and the first its early stop)
        updates = [alone[key].optimizer.updates for key in SEEDS]
        assert len(set(updates)) == 3, updates
    lrs = {round(logs[-1][M.LEARNING_RATE], 12) for logs in together.values()}
    assert len(lrs) > 1, lrs  # the learning rates really differ


def test_members_that_differ_in_a_shape_train_in_turn():
    specs = [ppo_spec({"hparams.batch_size": size}) for size in (128, 256)]
    ppo = registry.get("ppo")
    group = build_group("ppo", {key: ppo.trainer(spec, 7, "cpu") for key, spec in enumerate(specs)})
    assert isinstance(group, SequentialGroup)


def test_members_of_several_trials_keyed_apart_and_one_dropped():
    """A shared actor's load: members keyed by the driver (two trials, both with seed 0), each with its own
    spec; `drop` takes a pruned trial's member out, and the other goes on alone."""
    specs = [ppo_spec({"hparams.learning_rate": lr, "eval": {"episodes": 2}}) for lr in (1e-3, 3e-4)]
    worker = TrialWorkerGroup([s.model_dump(mode="json") for s in specs], [(10, 0, 0), (11, 1, 0)])
    assert isinstance(worker.group, BatchedPPO)
    first = worker.advance(seconds=0.0).seeds
    assert set(first) == {10, 11}
    assert worker.group.lr == [1e-3, 3e-4]  # each member's own rate
    parts = worker.advance(seconds=0.0, drop=[10]).seeds
    assert set(parts) == {11} and set(worker.group.members) == {11}
    rest = worker.advance(seconds=1e9).seeds
    assert rest[11].done and rest[11].final is not None


def test_a_member_that_cannot_be_built_fails_alone():
    """In a shared actor one trial's member may fail to build (here an environment that does not exist, or a
    checkpoint that does not fit): it is reported as that member's error, and the others train."""
    good = ppo_spec({"eval": {"episodes": 2}}, steps=512)
    broken = good.model_dump(mode="json") | {"env": "NoSuchEnv-v0"}
    worker = TrialWorkerGroup([good.model_dump(mode="json"), broken, good.model_dump(mode="json")],
                              [(0, 0, 0), (1, 1, 0), (2, 2, 1)], {2: b"not a checkpoint"})
    assert set(worker.group.members) == {0}
    parts = worker.advance(seconds=1e9).seeds
    assert "NoSuchEnv" in parts[1].error and isinstance(parts[2], SeedFailed), parts[2]
    assert parts[0].done and parts[0].final is not None
    assert set(worker.advance(seconds=1e9).seeds) == set(), "each error is reported once"
