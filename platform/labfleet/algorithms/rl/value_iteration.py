"""Value iteration (Bellman 1957; Sutton & Barto 2018, section 4.4) on an environment's own model.

The environment exposes its transition model as `env.unwrapped.P[s][a] = [(p, s', r, terminated), ...]`
(FrozenLake, Taxi, CliffWalking). One iteration is one synchronous sweep of the Bellman optimality backup:
    Q(s, a) = sum_{s'} p(s'|s, a) * (r + gamma * V(s') * (1 - terminated))
    V(s)    = max_a Q(s, a)
until max_s |V_new(s) - V(s)| < tolerance or the budget of sweeps is spent. The greedy policy
argmax_a Q(s, a) is then the exact reference against which the tabular learners are tested.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from labfleet import metrics as M
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import RLTrainer
from labfleet.rollout.envs import make_env
from labfleet.spec.models import ExperimentSpec


class ValueIterationHParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(0.99, ge=0, lt=1, description="Discount factor (< 1, so the backup contracts).")
    tolerance: float = Field(1e-10, gt=0, description="Stop once a sweep changes no value by more than this.")


def transition_tensors(P: dict, n_states: int, n_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """(continue, reward): continue[s, a, s'] = p(s'|s, a) over non-terminal transitions, reward[s, a] =
    expected immediate reward."""
    cont = np.zeros((n_states, n_actions, n_states))
    reward = np.zeros((n_states, n_actions))
    for s in range(n_states):
        for a in range(n_actions):
            for p, s_next, r, terminated in P[s][a]:
                reward[s, a] += p * r
                if not terminated:
                    cont[s, a, s_next] += p
    return cont, reward


def model_of(spec: ExperimentSpec) -> tuple[np.ndarray, np.ndarray]:
    """`transition_tensors` of the spec's environment, read from `env.unwrapped.P`."""
    assert spec.env is not None
    env = make_env(spec.env, spec.env_kwargs)
    try:
        n_states, n_actions = int(env.observation_space.n), int(env.action_space.n)  # type: ignore[attr-defined]
        return transition_tensors(env.unwrapped.P, n_states, n_actions)  # type: ignore[attr-defined]
    finally:
        env.close()


def bellman_optimality_backup(v: np.ndarray, cont: np.ndarray, reward: np.ndarray, gamma: float) -> np.ndarray:
    """Q(s, a) = R(s, a) + gamma * sum_s' P_cont(s'|s, a) V(s')."""
    return reward + gamma * cont @ v


class ValueIterationTrainer(RLTrainer):
    hparams_model = ValueIterationHParams
    hp: ValueIterationHParams

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        self.cont, self.reward = model_of(spec)
        self.v = np.zeros(self.reward.shape[0])
        self.q = np.zeros(self.reward.shape)
        self.residual = float("inf")

    @property
    def progress(self) -> int:
        return self.iterations

    @property
    def done(self) -> bool:
        return self.iterations >= self.spec.budget.total or self.residual < self.hp.tolerance

    def train_iteration(self) -> dict[str, float]:
        self.q = bellman_optimality_backup(self.v, self.cont, self.reward, self.hp.gamma)
        v_new = self.q.max(axis=1)
        self.residual = float(np.abs(v_new - self.v).max())
        self.v = v_new
        self.iterations += 1
        return {M.BELLMAN_RESIDUAL: self.residual}

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return np.argmax(self.q[obs], axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {"v": torch.from_numpy(self.v.copy()), "q": torch.from_numpy(self.q.copy()),
                "residual": self.residual, "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v, self.q = state["v"].numpy().copy(), state["q"].numpy().copy()
        self.residual = float(state["residual"])
        self.load_rl_state(state["rl"])


register(AlgorithmInfo(
    name="value_iteration", kind="rl", hparams=ValueIterationHParams, trainer=ValueIterationTrainer,
    summary="Value iteration on the environment's transition model (env.unwrapped.P)",
    action_spaces=("discrete",), observation_spaces=("discrete",), needs_transition_model=True,
    budget_units=("iterations",), seed_dependent=False, rollout_workers=False,
))
