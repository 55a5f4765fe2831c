"""Tabular SARSA (Rummery & Niranjan 1994; Sutton & Barto 2018, section 6.4): on-policy TD control.

One iteration, for each step (s, a, r, s', a') of the epsilon-greedy behaviour policy, where a' is the
action that policy actually takes next in s':
    Q(s, a) <- Q(s, a) + alpha * (r + gamma * Q(s', a') * (1 - terminated) - Q(s, a))
The last step of a rollout waits for the next rollout's first action. Where an episode is cut by a time
limit, no next action is taken in s' (the environment resets), so its value is the behaviour policy's
expectation sum_a' pi(a'|s') Q(s', a') (the expected-SARSA bootstrap).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labfleet import metrics as M
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import TabularHParams, TabularTrainer


class SarsaHParams(TabularHParams):
    """SARSA's hyperparameters: those of every tabular TD learner."""


def sarsa_update(q: np.ndarray, s: int, a: int, r: float, next_value: float, terminated: bool, alpha: float,
                 gamma: float) -> float:
    """One SARSA update in place with next_value = Q(s', a'); returns the TD error."""
    target = r + (0.0 if terminated else gamma * next_value)
    error = target - q[s, a]
    q[s, a] += alpha * error
    return float(error)


class SarsaTrainer(TabularTrainer):
    hparams_model = SarsaHParams
    hp: SarsaHParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pending: list[tuple[int, int, int, float]] = []  # (env, s, a, r) waiting for its a'

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        self.behaviour.epsilon = hp.epsilon_at(self.env_steps / self.spec.budget.total)
        rollout, logged = self.collect(self.behaviour, hp.n_envs, hp.n_steps)
        errors = [self._update(s, a, r, self.q[rollout.obs[0, i], rollout.actions[0, i]], False)
                  for i, s, a, r in self.pending]  # last rollout's final steps: a' is this rollout's first
        self.pending = []
        T, N = rollout.rewards.shape  # time-major
        for t in range(T):
            for i in range(N):
                s, a, r = int(rollout.obs[t, i]), int(rollout.actions[t, i]), float(rollout.rewards[t, i])
                if rollout.terminated[t, i]:
                    errors.append(self._update(s, a, r, 0.0, True))
                elif rollout.truncated[t, i]:
                    s_next = np.array([rollout.next_obs[t, i]])
                    expected = float((self.behaviour.probabilities(s_next)[0] * self.q[s_next[0]]).sum())
                    errors.append(self._update(s, a, r, expected, False))
                elif t + 1 < T:
                    errors.append(self._update(s, a, r, self.q[rollout.obs[t + 1, i], rollout.actions[t + 1, i]],
                                               False))
                else:
                    self.pending.append((i, s, a, r))
        self.iterations += 1
        logged.update({M.EPSILON: self.behaviour.epsilon, M.LEARNING_RATE: self.step_size()})
        if errors:
            logged[M.TD_ERROR] = float(np.mean(np.abs(errors)))
        return logged

    def _update(self, s: int, a: int, r: float, next_value: float, terminated: bool) -> float:
        error = sarsa_update(self.q, s, a, r, next_value, terminated, self.step_size(), self.hp.gamma)
        self.updates += 1
        return error

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending": [list(p) for p in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # With the environments restored, the pending steps get their a' from the next rollout; where the
        # environments restart, their next states will not be visited.
        self.pending = [(int(i), int(s), int(a), float(r)) for i, s, a, r in state.get("pending", [])] \
            if self.resume_exact else []


register(AlgorithmInfo(
    name="sarsa", kind="rl", hparams=SarsaHParams, trainer=SarsaTrainer,
    summary="Tabular SARSA (on-policy TD control) with epsilon-greedy exploration",
    action_spaces=("discrete",), observation_spaces=("discrete",),
))
