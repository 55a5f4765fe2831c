"""Policy iteration (Howard 1960; Sutton & Barto 2018, section 4.3) on an environment's own model.

Like value iteration it reads the transition model `env.unwrapped.P[s][a] = [(p, s', r, terminated), ...]`.
One iteration alternates the two steps until the policy is stable:
    evaluate  V_pi = (I - gamma P_pi)^-1 R_pi          (exact: one linear solve, not sweeps)
    improve   pi'(s) = argmax_a R(s, a) + gamma sum_s' P(s'|s, a) V_pi(s')
The improvement keeps pi(s) wherever it is among the maximisers, so that ties cannot make the policy
cycle and a stable policy means an optimal one. For a finite MDP this ends after at most |A|^|S|
improvements, in practice a handful; the resulting V_pi equals value iteration's V*.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from labfleet import metrics as M
from labfleet.algorithms.registry import AlgorithmInfo, register
from labfleet.algorithms.rl.base import RLTrainer
from labfleet.algorithms.rl.value_iteration import bellman_optimality_backup, model_of
from labfleet.spec.models import ExperimentSpec


class PolicyIterationHParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(0.99, ge=0, lt=1, description="Discount factor (< 1, so I - gamma P_pi is invertible).")
    tie_tolerance: float = Field(1e-12, ge=0, description="Action values this close count as tied when improving.")


def policy_evaluation(policy: np.ndarray, cont: np.ndarray, reward: np.ndarray, gamma: float) -> np.ndarray:
    """V_pi of a deterministic policy (S,): the solution of (I - gamma P_pi) V = R_pi."""
    states = np.arange(len(policy))
    p_pi, r_pi = cont[states, policy], reward[states, policy]  # (S, S), (S,)
    return np.linalg.solve(np.eye(len(policy)) - gamma * p_pi, r_pi)


def policy_improvement(policy: np.ndarray, q: np.ndarray, tie_tolerance: float) -> np.ndarray:
    """The greedy policy for Q (S, A), keeping the current action where it is among the maximisers."""
    best = q >= q.max(axis=1, keepdims=True) - tie_tolerance  # (S, A)
    keep = best[np.arange(len(policy)), policy]
    return np.where(keep, policy, np.argmax(q, axis=1))


class PolicyIterationTrainer(RLTrainer):
    hparams_model = PolicyIterationHParams
    hp: PolicyIterationHParams

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        self.cont, self.reward = model_of(spec)
        self.policy = np.zeros(self.reward.shape[0], dtype=np.int64)  # start from "always action 0"
        self.v = np.zeros(self.reward.shape[0])
        self.stable = False

    @property
    def progress(self) -> int:
        """Iterations, and the whole budget once the policy is stable: nothing is left to do."""
        return self.spec.budget.total if self.stable else self.iterations

    @property
    def metric_step(self) -> int:
        return self.iterations

    def train_iteration(self) -> dict[str, float]:
        self.v = policy_evaluation(self.policy, self.cont, self.reward, self.hp.gamma)
        q = bellman_optimality_backup(self.v, self.cont, self.reward, self.hp.gamma)
        improved = policy_improvement(self.policy, q, self.hp.tie_tolerance)
        changed = int((improved != self.policy).sum())
        self.policy, self.stable = improved, changed == 0
        self.iterations += 1
        return {M.POLICY_CHANGES: float(changed), M.BELLMAN_RESIDUAL: float(np.abs(q.max(axis=1) - self.v).max())}

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.policy[obs]

    def state_dict(self) -> dict[str, Any]:
        return {"policy": torch.from_numpy(self.policy.copy()), "v": torch.from_numpy(self.v.copy()),
                "stable": self.stable, "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy, self.v = state["policy"].numpy().copy(), state["v"].numpy().copy()
        self.stable = bool(state["stable"])
        self.load_rl_state(state["rl"])


register(AlgorithmInfo(
    name="policy_iteration", kind="rl", hparams=PolicyIterationHParams, trainer=PolicyIterationTrainer,
    summary="Policy iteration (exact evaluation, greedy improvement) on the transition model (env.unwrapped.P)",
    action_spaces=("discrete",), observation_spaces=("discrete",), needs_transition_model=True,
    budget_units=("iterations",), seed_dependent=False, rollout_workers=False,
))
