"""Seeds of one trial trained together in one process (`resources.seeds_per_actor`).

A group holds one ordinary trainer per seed (its member), so that everything per seed stays per seed: its
RNG streams, environments, normalisers, schedules, evaluations and its checkpoint, which is the member's
own `state_dict()` and restores into an unbatched trainer. What a group changes is how the members'
iterations run:

- `SequentialGroup` (any trainer): the members train in turn, one iteration each. The seeds share a
  process (no actor start-up, no imports, no Ray round trip per seed), not their arithmetic.
- a batched group (the class `AlgorithmInfo.seed_group` names; PPO's, A2C's, REINFORCE's, DQN's and DDPG's are in
  `labfleet.algorithms.rl.batched`): the members' networks are stacked and each iteration runs once for all of
  them (one policy call per environment step for all seeds, one optimiser step per minibatch for all seeds), on
  the algorithm's own loss, with per-seed masks where the unbatched algorithm would branch.

`train_iteration()` returns each live member's metrics, or the exception it raised: one seed's failure
(a trainer error, a non-finite loss) takes that seed out of the group and leaves the others training.
"""

from __future__ import annotations

import importlib
from typing import Any

from labfleet.algorithms.base import Trainer


class SequentialGroup:
    """Members trained one iteration each, in turn."""

    batched = False

    def __init__(self, members: dict[int, Trainer]):
        self.members = dict(members)

    def live(self) -> list[int]:
        return [seed for seed, trainer in self.members.items() if not trainer.done]

    def train_iteration(self) -> dict[int, dict[str, float] | BaseException]:
        out: dict[int, dict[str, float] | BaseException] = {}
        for seed in self.live():
            try:
                out[seed] = self.members[seed].train_iteration()
            except Exception as exc:  # this seed fails; the others go on
                out[seed] = exc
        return out

    def sync(self) -> None:
        """Bring every member's own state up to date (a batched group keeps it stacked while training)."""

    def drop(self, seed: int) -> None:
        """Take a failed seed out of the group."""
        trainer = self.members.pop(seed, None)
        if trainer is not None:
            trainer.close()

    def close(self) -> None:
        for trainer in self.members.values():
            trainer.close()
        self.members.clear()


def group_class(algorithm: str) -> Any:
    """The batched group class its `AlgorithmInfo.seed_group` names, or None."""
    from labfleet.algorithms import registry

    path = registry.get(algorithm).seed_group if ":" not in algorithm else ""
    if not path:
        return None
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def per_seed_hparams(algorithm: str) -> frozenset[str]:
    """The hyperparameters each member of the algorithm's batched group may hold its own value of (none
    without a batched group): trials that differ only in these can share an actor (`sweep.share_actors`)."""
    from labfleet.algorithms import registry

    if ":" in algorithm or not registry.get(algorithm).seed_group:
        return frozenset()
    return frozenset(registry.get(algorithm).per_seed_hparams)


def build_group(algorithm: str, members: dict[int, Trainer]) -> Any:
    """The fastest group for these members: batched where the algorithm has one that covers their spec."""
    cls = group_class(algorithm) if len(members) > 1 else None
    group = cls.build(members) if cls is not None else None
    return group if group is not None else SequentialGroup(members)
