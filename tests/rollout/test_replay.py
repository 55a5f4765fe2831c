"""The replay buffer's n-step transitions against hand computation: episode ends, time limits, the newest
steps, several environments stored time-major, and the ring's wrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labfleet.rollout.replay import ReplayBuffer
from labfleet.rollout.sampler import Rollout


def _rollout(rewards: list[list[float]], terminated: list[list[bool]], truncated: list[list[bool]]) -> Rollout:
    """A (T, N) rollout whose observations name their slot: obs = 100 * t + n, next_obs = obs + 0.5."""
    r = np.asarray(rewards, dtype=np.float32)
    T, N = r.shape
    obs = (100 * np.arange(T)[:, None] + np.arange(N)[None, :]).astype(np.float32)[..., None]
    return Rollout(obs=obs, actions=np.zeros((T, N), dtype=np.int64), rewards=r,
                   terminated=np.asarray(terminated), truncated=np.asarray(truncated), next_obs=obs + 0.5)


def test_n_step_transitions_stop_at_episode_ends_and_at_the_newest_step():
    # env 0: rewards 1, 2 (terminal), 3, 4; env 1: 10, 20, 30 (time limit), 40. Stored as t * 2 + n.
    buffer = ReplayBuffer(16, (1,), np.float32, (), np.int64, seed=0, n_step=3, gamma=0.5, n_envs=2)
    buffer.add_rollout(_rollout([[1, 10], [2, 20], [3, 30], [4, 40]],
                                [[False, False], [True, False], [False, False], [False, False]],
                                [[False, False], [False, False], [False, True], [False, False]]))
    out = buffer.n_step_returns(np.arange(8))
    # slot: (sum of rewards, the slot it bootstraps from, terminal there, gamma^k)
    expected = {
        0: (1 + 0.5 * 2, 2, True, 0.25),          # env 0 from t0: its episode ends at t1
        2: (2, 2, True, 0.5),
        4: (3 + 0.5 * 4, 6, False, 0.25),          # t3 is the newest step of env 0
        6: (4, 6, False, 0.5),
        1: (10 + 0.5 * 20 + 0.25 * 30, 5, False, 0.125),  # n = 3 steps, the last one cut by the time limit
        3: (20 + 0.5 * 30, 5, False, 0.25),        # the time limit ends the sum; it is bootstrapped
        5: (30, 5, False, 0.5),
        7: (40, 7, False, 0.5),
    }
    for slot, (total, last, terminal, discount) in expected.items():
        assert out["rewards"][slot] == pytest.approx(total), slot
        assert out["next_obs"][slot, 0] == buffer.next_obs[last, 0], slot
        assert out["terminated"][slot] == terminal, slot
        assert out["discounts"][slot] == pytest.approx(discount), slot


def test_n_step_sums_cross_the_rings_wrap_and_never_reach_overwritten_steps():
    buffer = ReplayBuffer(5, (1,), np.float32, (), np.int64, seed=0, n_step=3, gamma=0.9, n_envs=1)
    no = [[False]] * 7
    buffer.add_rollout(_rollout([[float(t + 1)] for t in range(7)], no, no))  # rewards 1..7 over 5 slots
    # slots now hold t = 5, 6 (slots 0, 1) and t = 2, 3, 4 (slots 2, 3, 4); the oldest is slot 2
    out = buffer.n_step_returns(np.array([2, 4, 0, 1]))
    assert out["rewards"].tolist() == pytest.approx([3 + 0.9 * 4 + 0.81 * 5, 5 + 0.9 * 6 + 0.81 * 7, 6 + 0.9 * 7, 7])
    assert out["discounts"].tolist() == pytest.approx([0.729, 0.729, 0.81, 0.9])
    assert out["next_obs"][:, 0].tolist() == [400.5, 600.5, 600.5, 600.5]


def test_one_step_sampling_is_the_stored_transition():
    buffer = ReplayBuffer(8, (1,), np.float32, (), np.int64, seed=3, n_envs=2)
    buffer.add_rollout(_rollout([[1, 2], [3, 4]], [[False, True], [False, False]], [[False, False], [True, False]]))
    batch = buffer.sample(16, torch.device("cpu"))
    assert "discounts" not in batch
    slots = ((batch["obs"][:, 0] // 100) * 2 + batch["obs"][:, 0] % 100).long()
    assert torch.equal(batch["rewards"], torch.as_tensor(buffer.rewards)[slots])
    assert torch.equal(batch["terminated"], torch.as_tensor(buffer.terminated)[slots])


def test_a_rollout_of_another_width_is_refused():
    buffer = ReplayBuffer(8, (1,), np.float32, (), np.int64, seed=0, n_envs=2)
    with pytest.raises(ValueError, match="a rollout of 1 environments for a buffer of 2"):
        buffer.add_rollout(_rollout([[1.0]], [[False]], [[False]]))


def _n_step_by_hand(buffer: ReplayBuffer, i: int) -> tuple[float, int, int]:
    """One stored transition's n-step sum, the slot it bootstraps from and the steps summed, one step at a
    time as the definition reads: the same environment's next steps, until an episode ends, n are summed or
    the next step is not stored yet."""
    total, slot, steps = np.float32(0), i, 0
    newer = (buffer.position - i - 1) % buffer.capacity
    for j in range(buffer.n_step):
        if j * buffer.n_envs > newer:
            break
        slot = (i + j * buffer.n_envs) % buffer.capacity
        total += np.float32(buffer.gamma ** j) * buffer.rewards[slot]
        steps = j + 1
        if buffer.ends[slot]:
            break
    return float(total), slot, steps


@pytest.mark.parametrize("seed", range(6))
def test_n_step_transitions_equal_the_step_by_step_definition(seed: int):
    rng = np.random.default_rng(seed)
    n_envs, capacity, n_step = int(rng.integers(1, 4)), int(rng.integers(6, 30)), int(rng.integers(2, 6))
    buffer = ReplayBuffer(capacity, (1,), np.float32, (), np.int64, seed=seed, n_step=n_step, gamma=0.9, n_envs=n_envs)
    T = int(rng.integers(2, 3 * capacity // n_envs + 2))  # from part full to wrapped more than once
    buffer.add_rollout(_rollout(rng.normal(size=(T, n_envs)).tolist(), (rng.random((T, n_envs)) < 0.15).tolist(),
                                (rng.random((T, n_envs)) < 0.1).tolist()))
    idx = np.arange(buffer.size)
    out = buffer.n_step_returns(idx)
    for k, i in enumerate(idx):
        total, slot, steps = _n_step_by_hand(buffer, int(i))
        assert out["rewards"][k] == np.float32(total), i
        assert out["next_obs"][k, 0] == buffer.next_obs[slot, 0] and out["terminated"][k] == buffer.terminated[slot]
        assert out["discounts"][k] == np.float32(0.9 ** steps), i
