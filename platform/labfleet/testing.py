"""The shared trainer contract as functions you call on your own trainer, as SB3's `check_env` and
`optuna.testing` offer (labfleet's own suite, `tests/algorithms/test_trainer_contract.py`, runs the same
functions over every built-in):

    from labfleet.testing import check_trainer
    from labfleet.spec.loading import load_spec

    spec = load_spec("my_spec.yaml", {"budget.iterations": 50})
    check_trainer(lambda seed: MyTrainer(spec, seed, "cpu"))

Each check raises AssertionError saying what broke. `build(seed)` must return a fresh trainer of one
resolved spec (small budget: the checks train it to the end).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from labfleet import metrics as M
from labfleet.algorithms.base import Trainer

Build = Callable[[int], Trainer]


def without_timing(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics that do not depend on wall-clock time (`time/sps` does)."""
    return {k: v for k, v in metrics.items() if not k.startswith(M.SPS)}


def check_checkpoint_round_trip(build: Build) -> None:
    """A checkpoint loads with `torch.load(weights_only=True)`, restores the same next actions (probe) and
    progress, and two restores of one checkpoint continue identically."""
    trainer = build(0)
    initial = trainer.probe()
    # Train until something that acts has changed (sparse tasks need a few episodes), so that the
    # comparison below could tell a broken restore from a good one.
    while np.array_equal(initial, trainer.probe()) and not trainer.done:
        trainer.train_iteration()
    assert not np.array_equal(initial, trainer.probe()), "training within the budget changed no action"
    data = trainer.checkpoint_bytes()
    state = torch.load(io.BytesIO(data), weights_only=True)
    assert isinstance(state, dict), "state_dict() must return a dict"
    restored = build(0)
    restored.restore_bytes(data)
    np.testing.assert_array_equal(restored.probe(), trainer.probe())
    assert restored.progress == trainer.progress, "progress is not restored"
    if restored.done:
        return
    again = build(0)
    again.restore_bytes(data)
    assert without_timing(restored.train_iteration()) == without_timing(again.train_iteration()), \
        "two restores of one checkpoint continue differently"
    np.testing.assert_array_equal(restored.probe(), again.probe())


def check_determinism(build: Build, seed_dependent: bool = True) -> None:
    """The same seed gives the same metrics and actions; another seed differs (where the seed matters)."""
    runs = []
    for seed in (3, 3, 4):
        trainer = build(seed)
        metrics = [without_timing(trainer.train_iteration()) for _ in range(3)]
        metrics.append(trainer.evaluate())
        runs.append((metrics, trainer.probe()))
    assert runs[0][0] == runs[1][0], "the same seed gave other metrics"
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    if seed_dependent:
        assert runs[0][0] != runs[2][0], "another seed gave the same metrics"
    else:  # a planner: the seed only picks evaluation episodes
        assert runs[0][0][:-1] == runs[2][0][:-1]


def check_pickling(build: Build) -> None:
    """A trainer pickles (Ray ships it between processes) into one that acts the same."""
    trainer = build(0)
    trainer.train_iteration()
    clone = pickle.loads(pickle.dumps(trainer))
    assert type(clone) is type(trainer)
    np.testing.assert_array_equal(clone.probe(), trainer.probe())
    assert clone.progress == trainer.progress


def check_budget(build: Build, primary_metric: str | None = None) -> set[str]:
    """Training ends once the budget is spent and the final evaluation has the primary metric; returns the
    metric names that training logged."""
    trainer = build(0)
    names: set[str] = set()
    while not trainer.done:
        names |= set(trainer.train_iteration())
    assert trainer.progress >= trainer.spec.budget.total, "done before the budget was spent"
    final = trainer.evaluate()
    if primary_metric:
        assert primary_metric in final, f"the final evaluation has no {primary_metric}"
    return names


def check_evaluate_leaves_training_untouched(build: Build) -> None:
    """`evaluate()` uses generators of its own: training after it goes on as if it had not run."""
    a, b = build(0), build(0)
    a.train_iteration()
    b.train_iteration()
    a.evaluate()
    assert without_timing(a.train_iteration()) == without_timing(b.train_iteration()), \
        "evaluate() changed the training state"


def flat_state(state: Any, prefix: str = "") -> dict[str, Any]:
    """A state dict flattened to {path: leaf}."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flat_state(value, f"{prefix}.{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flat_state(value, f"{prefix}[{i}]").items()}
    return {prefix: state}


def state_differences(a: Any, b: Any, only: tuple[str, ...] = ()) -> list[str]:
    """The paths at which two state dicts differ, bit for bit (entries one of them lacks included);
    `only`: compare just the paths that start with these prefixes (e.g. ".model")."""
    mine, theirs = flat_state(a), flat_state(b)
    keys = sorted(k for k in mine.keys() | theirs.keys() if not only or k.startswith(only))
    return [k for k in keys if k not in mine or k not in theirs or not (
        torch.equal(mine[k], theirs[k]) if isinstance(mine[k], torch.Tensor) and isinstance(theirs[k], torch.Tensor)
        else mine[k] == theirs[k])]


def check_exact_resume(build: Build, iterations: int = 3) -> None:
    """A trainer restored from a checkpoint taken mid-training goes on exactly as the original: the same
    metrics at every later iteration and bit-identical final state (parameters, optimiser, buffers, RNGs).
    Checked where the trainer says the resume is exact (`resume_exact`; RL environments that cannot be
    saved make it approximate, see `labfleet.rollout.envstate`)."""
    original = build(0)
    for _ in range(iterations):
        if not original.done:
            original.train_iteration()
    restored = build(0)
    restored.restore_bytes(original.checkpoint_bytes())
    if not restored.resume_exact:
        return
    steps = 0
    while not original.done:
        assert not restored.done, "the restored trainer finished before the original"
        a, b = without_timing(original.train_iteration()), without_timing(restored.train_iteration())
        assert a == b, f"{steps + 1} iterations after the restore, the metrics differ: {a} against {b}"
        steps += 1
    assert restored.done, "the restored trainer did not finish with the original"
    assert original.evaluate() == restored.evaluate(), "the final evaluations differ"
    differ = state_differences(original.state_dict(), restored.state_dict())
    assert not differ, f"the final states differ at {differ[:5]}"


def check_trainer(build: Build, primary_metric: str | None = None, seed_dependent: bool = True) -> None:
    """Every check of the contract."""
    check_checkpoint_round_trip(build)
    check_exact_resume(build)
    check_determinism(build, seed_dependent)
    check_pickling(build)
    check_budget(build, primary_metric)
    check_evaluate_leaves_training_untouched(build)
