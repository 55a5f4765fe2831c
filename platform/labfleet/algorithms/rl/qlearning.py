"""Tabular Q-learning (Watkins 1989; Sutton & Barto 2018, section 6.5): off-policy TD control.

One iteration, for each transition (s, a, r, s') collected with the epsilon-greedy behaviour policy:
    Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') * (1 - terminated) - Q(s, a))
A transition cut by a time limit is bootstrapped (time limits are not terminal states).
"""

from __future__ import annotations

import numpy as np

from labfleet import metrics as M
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import TabularHParams, TabularTrainer


class QLearningHParams(TabularHParams):
    """Q-learning's hyperparameters: those of every tabular TD learner."""


def q_learning_update(q: np.ndarray, s: int, a: int, r: float, s_next: int, terminated: bool, alpha: float,
                      gamma: float) -> float:
    """One Q-learning update in place; returns the TD error."""
    target = r + (0.0 if terminated else gamma * q[s_next].max())
    error = target - q[s, a]
    q[s, a] += alpha * error
    return float(error)


class QLearningTrainer(TabularTrainer):
    hparams_model = QLearningHParams
    hp: QLearningHParams

    def train_iteration(self) -> dict[str, float]:
        hp = self.hp
        self.behaviour.epsilon = hp.epsilon_at(self.env_steps / self.spec.budget.total)
        rollout, logged = self.collect(self.behaviour, hp.n_envs, hp.n_steps)
        errors = []
        for t in range(rollout.rewards.shape[0]):
            for i in range(rollout.rewards.shape[1]):
                errors.append(q_learning_update(
                    self.q, rollout.obs[t, i], rollout.actions[t, i], rollout.rewards[t, i], rollout.next_obs[t, i],
                    rollout.terminated[t, i], self.step_size(), hp.gamma))
                self.updates += 1
        self.iterations += 1
        logged.update({M.TD_ERROR: float(np.mean(np.abs(errors))), M.EPSILON: self.behaviour.epsilon,
                       M.LEARNING_RATE: self.step_size()})
        return logged


register(AlgorithmInfo(
    name="qlearning", kind="rl", hparams=QLearningHParams, trainer=QLearningTrainer,
    summary="Tabular Q-learning with epsilon-greedy exploration",
    action_spaces=("discrete",), observation_spaces=("discrete",),
))
