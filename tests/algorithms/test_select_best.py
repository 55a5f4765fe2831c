"""`eval.select_best`: the final policy is the best of the best evaluated networks, evaluated again on fresh
episodes (algorithms/rl/base.py), for one trainer, after a restore, and for seeds trained together in one actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.algorithms.rl.base import SELECT_FINALISTS
from labfleet.errors import SpecError
from labfleet.orchestration.trial import TrialWorker, TrialWorkerGroup
from labfleet.rollout.envs import derive_seed
from labfleet.rollout.sampler import evaluate_policy
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

DQN = {"budget.env_steps": 4096, "hparams.learning_starts": 256, "hparams.train_freq": 128,
       "hparams.gradient_steps": 32, "hparams.net_arch": [32, 32], "eval.episodes": 3, "eval.select_best": True,
       "eval.every_steps": 512}


def dqn(seed: int = 0, **overrides):
    return registry.get("dqn").trainer(load_spec(EXPERIMENTS / "cartpole_dqn.yaml", {**DQN, **overrides}), seed, "cpu")


def state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def finalists(candidates: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The SELECT_FINALISTS best candidates (env step, return), best first, a later one before an earlier tie."""
    return sorted(reversed(candidates), key=lambda c: -c[1])[:SELECT_FINALISTS]


def returns_of(trainer, greedy, index: int) -> float:
    return float(evaluate_policy(trainer.env_maker, greedy, trainer.spec.eval.episodes,
                                 derive_seed(trainer.seed, "eval", index)).mean())


def test_the_final_policy_is_the_finalist_best_on_two_evaluations_evaluated_on_fresh_episodes():
    trainer = dqn()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    candidates: list[tuple[int, float]] = []
    while not trainer.done:
        trainer.train_iteration()
        if not trainer.done and trainer.env_steps % 512 == 0:
            candidates.append((trainer.env_steps, trainer.evaluate()[M.EVAL_RETURN_MEAN]))
            snapshots[trainer.env_steps] = state(trainer.q_net)
    # the network training ends with made poor, so that an earlier one must win: a constant Q always pushes left
    with torch.no_grad():
        for p in trainer.q_net.parameters():
            p.zero_()
    index = trainer.evaluations
    always_left = returns_of(trainer, lambda obs: np.zeros(len(obs), dtype=np.int64), index)
    candidates.append((trainer.env_steps, always_left))  # the end of training is a candidate too
    snapshots[trainer.env_steps] = state(trainer.q_net)
    best = finalists(candidates)
    assert len(candidates) > SELECT_FINALISTS
    # each finalist again on the same fresh episodes; the best mean of its two evaluations wins
    probe = dqn()
    scores = []
    for step, first in best:
        probe.q_net.load_state_dict(snapshots[step])
        scores.append((first + returns_of(probe, probe.greedy_actions, index + 1)) / 2)
    winner = best[max(range(len(best)), key=lambda i: (scores[i], -i))][0]
    assert winner != trainer.env_steps, "the test needs a winner other than the end of training"

    final = trainer.evaluate()

    assert final[M.LAST_RETURN_MEAN] == always_left
    assert final[M.SELECTED_STEP] == winner
    for name, value in trainer.q_net.state_dict().items():
        assert torch.equal(value, snapshots[winner][name]), name
    assert final[M.EVAL_RETURN_MEAN] == returns_of(trainer, trainer.greedy_actions, index + 2)  # fresh episodes
    # evaluated again (a reloaded run, `labfleet enjoy`): the same selection, fresh episodes
    again = trainer.evaluate()
    assert again[M.SELECTED_STEP] == winner and trainer.evaluations == index + 4


def test_without_evaluations_on_the_way_the_end_of_training_is_the_policy():
    trainer = dqn()
    while not trainer.done:
        trainer.train_iteration()
    end = state(trainer.q_net)
    final = trainer.evaluate()  # the only candidate
    assert final[M.SELECTED_STEP] == trainer.env_steps
    assert all(torch.equal(v, end[k]) for k, v in trainer.q_net.state_dict().items())


def test_the_finalists_survive_a_restore():
    original = dqn()
    evaluations = 0
    while evaluations < 3:
        original.train_iteration()
        if original.env_steps % 512 == 0:
            original.evaluate()
            evaluations += 1
    restored = dqn()
    restored.restore_bytes(original.checkpoint_bytes())
    assert [f["step"] for f in restored._finalists] == [f["step"] for f in original._finalists]
    for trainer in (original, restored):
        while not trainer.done:
            trainer.train_iteration()
            if not trainer.done and trainer.env_steps % 512 == 0:
                trainer.evaluate()
    assert original.evaluate() == restored.evaluate()


def candidates_of(records: list[tuple[int, dict[str, float]]]) -> list[tuple[int, float]]:
    """The candidates from what a seed run logs: its evaluations, the last one carrying select/*."""
    evals = [(step, values) for step, values in records if M.EVAL_RETURN_MEAN in values]
    *during, (end_step, final) = evals
    return [(step, values[M.EVAL_RETURN_MEAN]) for step, values in during] + [(end_step, final[M.LAST_RETURN_MEAN])]


@pytest.mark.parametrize("seeds_per_actor", [1, 2])
def test_trial_workers_select_per_seed_and_checkpoint_the_selected_network(seeds_per_actor):
    spec = load_spec(EXPERIMENTS / "cartpole_dqn.yaml", {**DQN, "seeds": [0, 1],
                                                           "resources.seeds_per_actor": seeds_per_actor})
    data = spec.model_dump(mode="json")
    if seeds_per_actor == 1:
        results = {seed: TrialWorker(data, seed).advance(seconds=300) for seed in (0, 1)}
    else:
        group = TrialWorkerGroup(data, [0, 1])
        assert group.group.batched  # the stacked DQN, not seeds in turn
        results = group.advance(seconds=300).seeds
    for seed, result in results.items():
        assert result.done
        step = result.final[M.SELECTED_STEP]
        assert step in [s for s, _ in finalists(candidates_of(result.records))]
        trainer = registry.get("dqn").trainer(spec, seed, "cpu")
        trainer.restore_bytes(result.checkpoint)
        [kept] = trainer._finalists  # the checkpoint holds the selected network as the policy
        assert kept["step"] == step
        assert all(torch.equal(v, kept["policy"][k]) for k, v in trainer.q_net.state_dict().items())
        assert trainer.evaluate()[M.SELECTED_STEP] == step


@pytest.mark.parametrize("spec", ["frozenlake_qlearning.yaml", "cartpole_es.yaml", "ring_gan.yaml"])
def test_select_best_is_refused_where_there_is_no_policy_network(spec):
    with pytest.raises(SpecError) as raised:
        load_spec(EXPERIMENTS / spec, {"eval.select_best": True})
    assert "eval.select_best" in str(raised.value) and "dqn" in str(raised.value)
