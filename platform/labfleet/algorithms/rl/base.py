"""Plumbing shared by RL trainers: environments, sampling, step counting, evaluation, probes.

An algorithm module subclasses `RLTrainer` and writes its update in `train_iteration()`; everything
about where environments run and how they are seeded lives here and in `labfleet.rollout`.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from pydantic import Field

from labfleet import metrics as M
from labfleet.algorithms.base import Trainer
from labfleet.algorithms.optim import ScheduledOptimizer, StepSizeHParams, scheduled_learning_rate
from labfleet.algorithms.rl.exploration import EpsilonGreedyHParams, EpsilonGreedyTable
from labfleet.algorithms.rl.networks import ActorCritic, NumpyPolicy, ObservationEncoder
from labfleet.algorithms.rl.normalize import ObservationNormalizer, RewardScaler
from labfleet.algorithms.sizes import EnvCount, StepCount
from labfleet.rollout.envs import EnvMaker, derive_seed
from labfleet.rollout.sampler import NoisePolicy, Rollout, VectorSampler, evaluate_policy
from labfleet.spec.models import ExperimentSpec

if TYPE_CHECKING:
    from labfleet.rollout.workers import RolloutWorkerGroup


@contextmanager
def seeded_torch(seed: int):
    """Run a block (network construction) under a seed without disturbing the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


SELECT_FINALISTS = 4  # eval.select_best: the best evaluated networks kept to the end, where each is evaluated again


class RLTrainer(Trainer):
    """Counts environment steps against `budget.env_steps` and evaluates the greedy policy.

    Subclasses set up their networks in `__init__` (inside `seeded_torch`), implement
    `train_iteration()`, `greedy_actions()` and their part of `state_dict()` / `load_state_dict()`
    (calling `self.rl_state()` / `self.load_rl_state()` for the shared counters).
    """

    # The attribute holding the network `greedy_actions` reads (its observation normaliser inside it): what
    # `eval.select_best` keeps. None: no such network (tables, ES's parameter vector, planners).
    POLICY: ClassVar[str | None] = None

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        self.env_maker = EnvMaker.from_spec(spec)
        spaces = self.env_maker.spaces()
        self.observation_space: gym.Space = spaces[0]
        self.action_space: gym.Space = spaces[1]
        # Running normalisation (hparams.normalize of the deep learners; see `normalize`): the trainer alone
        # updates the statistics, once per rollout.
        norm = getattr(self.hp, "normalize", None)
        box = isinstance(self.observation_space, gym.spaces.Box)
        self.obs_normalizer = (ObservationNormalizer(tuple(self.observation_space.shape or ()), norm.clip_obs,
                                                     norm.epsilon) if norm is not None and norm.obs and box else None)
        self.reward_scaler = (RewardScaler(float(getattr(self.hp, "gamma", 0.99)), norm.clip_reward, norm.epsilon)
                              if norm is not None and norm.reward else None)
        self.env_steps = 0
        self.iterations = 0
        self.evaluations = 0
        self._sampler: VectorSampler | RolloutWorkerGroup | None = None
        self._sampler_state: dict[str, Any] | None = None  # restored, for the sampler the next collect builds
        self._generation = 0  # bumped on a restore without environment state: fresh, seeded streams
        self._started = time.perf_counter()
        self._steps_at_start = 0
        # eval.select_best: the best evaluations so far, best first, each {"return", "step", "policy" (the
        # network's state)}; at the end, the one selected ({"step", "last_return"})
        self._finalists: list[dict[str, Any]] = []
        self._selected: dict[str, float] | None = None

    # --- sampling --------------------------------------------------------------------------------
    def collect(self, policy: NoisePolicy, n_envs: int, n_steps: int) -> tuple[Rollout, dict[str, float]]:
        """One vectorised rollout of n_steps from each of n_envs environments, and its episode metrics:
        in this process, or from `resources.rollout_workers` Ray actors (the same rollout)."""
        rollout = self.sampler(policy, n_envs).collect(policy, n_steps)
        return rollout, self.account(rollout)

    def sampler(self, policy: NoisePolicy, n_envs: int) -> VectorSampler | RolloutWorkerGroup:
        """The trainer's sampler (made on first use, from the restored sampler state if there is one)."""
        if self._sampler is None:
            workers = self.spec.resources.rollout_workers
            state, self._sampler_state = self._sampler_state, None
            if workers:
                from labfleet.rollout.workers import RolloutWorkerGroup  # Ray, only where workers are asked for

                self._sampler = RolloutWorkerGroup(self.env_maker, n_envs, workers, self.seed, self._generation,
                                                   policy, self.spec.resources.cpus_per_worker, state)
            else:
                self._sampler = VectorSampler(self.env_maker, n_envs, self.seed, generation=self._generation,
                                              state=state)
        return self._sampler

    def account(self, rollout: Rollout) -> dict[str, float]:
        """Count a collected rollout: normalisation statistics, env steps, and its episode metrics."""
        if self.obs_normalizer is not None:
            self.obs_normalizer.update(rollout.obs)
        if self.reward_scaler is not None:
            self.reward_scaler.observe(rollout.rewards, rollout.terminated, rollout.truncated)
        self.env_steps += rollout.steps
        elapsed = time.perf_counter() - self._started
        logged: dict[str, float] = {M.ENV_STEPS: float(self.env_steps),
                                    M.SPS: (self.env_steps - self._steps_at_start) / max(elapsed, 1e-9)}
        if rollout.episode_returns:
            logged[M.TRAIN_EPISODE_RETURN] = float(np.mean(rollout.episode_returns))
            logged[M.TRAIN_EPISODE_LENGTH] = float(np.mean(rollout.episode_lengths))
        return logged

    def encoder(self) -> ObservationEncoder:
        """A new observation encoder on the trainer's shared normaliser, as `hparams.encoder` asks."""
        return ObservationEncoder(self.observation_space, self.obs_normalizer, getattr(self.hp, "encoder", "auto"),
                                  getattr(self.hp, "encoder_kwargs", None))

    def target_copy(self, net: torch.nn.Module) -> torch.nn.Module:
        """A target network: a deep copy that shares the trainer's observation normaliser (its statistics are
        not learned, so a target must not keep a stale copy of them)."""
        memo = {} if self.obs_normalizer is None else {id(self.obs_normalizer): self.obs_normalizer}
        return copy.deepcopy(net, memo)

    def scale_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """Rewards as the learner sees them: scaled by the return statistics with `normalize.reward`."""
        return rewards if self.reward_scaler is None else self.reward_scaler.scale(rewards)

    def as_tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not array.flags.writeable:  # a zero-copy view of a rollout that came through Ray's object store
            array = array.copy()
        return torch.as_tensor(array, dtype=dtype, device=self.device)

    # --- the Trainer interface -----------------------------------------------------------------
    @property
    def progress(self) -> int:
        return self.env_steps

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """The greedy policy on `eval.episodes` episodes, seeded afresh for each evaluation. With
        `eval.select_best`, an evaluation during training also keeps the network among the finalists if it is
        one of the SELECT_FINALISTS best so far, and the one at the end selects (`_evaluate_selected`)."""
        select = self.spec.eval.select_best and self.POLICY is not None
        if select and self.done:
            return self._evaluate_selected()
        result = self._evaluate_greedy()
        if select:
            self._remember(result[M.EVAL_RETURN_MEAN])
        return result

    def _evaluate_greedy(self) -> dict[str, float]:
        returns = evaluate_policy(self.env_maker, self.greedy_actions,
                                  self.spec.eval.episodes, derive_seed(self.seed, "eval", self.evaluations))
        self.evaluations += 1
        return {M.EVAL_RETURN_MEAN: float(returns.mean()), M.EVAL_RETURN_STD: float(returns.std())}

    def _remember(self, mean_return: float) -> None:
        """The policy network as it is now among the finalists, if its return is one of the best (best first;
        a later network goes before an earlier one with the same return)."""
        if len(self._finalists) == SELECT_FINALISTS and mean_return < self._finalists[-1]["return"]:
            return
        policy: torch.nn.Module = getattr(self, str(self.POLICY))
        snapshot = {"return": mean_return, "step": self.env_steps,
                    "policy": {k: v.detach().clone() for k, v in policy.state_dict().items()}}
        self._finalists = sorted([snapshot, *self._finalists], key=lambda f: -f["return"])[:SELECT_FINALISTS]

    def _evaluate_selected(self) -> dict[str, float]:
        """The end of training under `eval.select_best`. The network training ended with is evaluated and is a
        candidate too. Twenty evaluations of 20 episodes rank many networks at 500 alike, and one that scored
        500 may fail on other episodes, so every finalist is evaluated again, all on the same fresh episodes,
        and the best mean over its two evaluations wins (ties: the better first evaluation, then the later).
        The winner becomes the policy and is evaluated once more on fresh episodes, so that the reported
        return is not the maximum it was chosen by."""
        policy: torch.nn.Module = getattr(self, str(self.POLICY))
        if self._selected is None:
            last = self._evaluate_greedy()[M.EVAL_RETURN_MEAN]
            self._remember(last)
            seed = derive_seed(self.seed, "eval", self.evaluations)
            scores = []
            for finalist in self._finalists:
                policy.load_state_dict(finalist["policy"])
                again = evaluate_policy(self.env_maker, self.greedy_actions, self.spec.eval.episodes, seed)
                scores.append((finalist["return"] + float(again.mean())) / 2)
            self.evaluations += 1
            winner = self._finalists[max(range(len(scores)), key=lambda i: (scores[i], -i))]
            policy.load_state_dict(winner["policy"])
            self._selected = {"step": winner["step"], "last_return": last}
            self._finalists = [winner]
        return {**self._evaluate_greedy(), M.SELECTED_STEP: float(self._selected["step"]),
                M.LAST_RETURN_MEAN: self._selected["last_return"]}

    def probe(self) -> np.ndarray:
        space = self.observation_space
        space.seed(derive_seed(self.seed, "probe"))
        obs = np.stack([space.sample() for _ in range(64)])
        if isinstance(space, gym.spaces.Box):
            obs = np.clip(np.nan_to_num(obs, posinf=3.0, neginf=-3.0), -3.0, 3.0).astype(space.dtype)
        return self.greedy_actions(obs)

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
        self._sampler = None

    def rl_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"env_steps": self.env_steps, "iterations": self.iterations,
                                 "evaluations": self.evaluations}
        if self.obs_normalizer is not None:  # also inside the networks' state; here for a trainer-free reader
            state["obs_rms"] = self.obs_normalizer.state_dict()
        if self.reward_scaler is not None:
            state["reward_scaler"] = self.reward_scaler.state_dict()
        if self._finalists:
            state["finalists"] = self._finalists
        if self._selected is not None:
            state["selected"] = self._selected
        # The environments mid-episode and the action-noise streams, where the environments can be saved
        # (rollout/envstate.py): with them a restored trainer goes on exactly as this one would.
        sampler = self._sampler.get_state() if self._sampler is not None else self._sampler_state
        if sampler is not None:
            state["sampler"] = sampler
        # (before any sampling, or without any, a restored trainer starts the same streams: exact too)
        state["exact"] = sampler is not None or (self._sampler is None and self.resume_exact)
        return state

    def load_rl_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state["env_steps"])
        self.iterations = int(state["iterations"])
        self.evaluations = int(state["evaluations"])
        self._finalists = list(state.get("finalists", []))
        self._selected = state.get("selected")
        if self.obs_normalizer is not None:
            self.obs_normalizer.load_state_dict(state["obs_rms"])
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(state["reward_scaler"])
        if self._sampler is not None:
            self._sampler.close()
        self._sampler = None
        self._sampler_state = state.get("sampler")
        if state.get("exact", self.env_steps == 0):  # (a checkpoint older than exact resume: only at step 0)
            self.resume_exact = True  # the environments go on from where they were (or from their start)
            self._generation = 0
        else:
            # Environments that cannot be saved restart: fresh episodes on streams seeded from (seed, env
            # index, env_steps at restore), so that the resume is reproducible, though not exact.
            self.resume_exact = False
            self._generation = self.env_steps
            if self.reward_scaler is not None:
                self.reward_scaler.restart()  # the episodes restart, and with them their returns
        self._started = time.perf_counter()
        self._steps_at_start = self.env_steps


def flatten(t: torch.Tensor) -> torch.Tensor:
    """A rollout's (T, N, ...) as one batch (T * N, ...), time-major."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class ActorCriticTrainer(RLTrainer):
    """RL trainers whose model is one `ActorCritic` (separate policy and value MLPs) trained by one
    `ScheduledOptimizer`: REINFORCE, A2C, PPO. Their hparams have `net_arch` and `activation`."""

    POLICY = "ac"

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        hp: Any = self.hp
        with seeded_torch(derive_seed(seed, "init")):
            self.ac = ActorCritic(self.observation_space, self.action_space, hp.net_arch, hp.activation,
                                  encoder=self.encoder()).to(self.device)
        self.optimizer = ScheduledOptimizer(self.ac.parameters(), hp)
        self.actor = NumpyPolicy(self.ac.policy, self.device)

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.actor.greedy(obs)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.ac.state_dict(), "optimizer": self.optimizer.state_dict(), "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ac.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_rl_state(state["rl"])


class TabularHParams(StepSizeHParams, EpsilonGreedyHParams):
    """Hyperparameters of the tabular TD learners: the step size alpha with the shared schedules, the
    epsilon-greedy schedule, and these."""

    learning_rate: float | str = Field(0.1, description='Step size alpha, or "lin_<value>".')
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    n_envs: EnvCount = Field(8, description="Environments stepped together.")
    n_steps: StepCount = Field(1, description="Steps per environment between batches of updates.")
    q_init: float = Field(0.0, description="Initial value of every Q(s, a).")


class TabularTrainer(RLTrainer):
    """RL trainers over a Q table (discrete observations and actions): Q-learning, SARSA."""

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        hp = self.hp
        assert isinstance(hp, TabularHParams)
        n_states, n_actions = int(self.observation_space.n), int(self.action_space.n)  # type: ignore[attr-defined]
        self.q = np.full((n_states, n_actions), float(hp.q_init))  # (S, A)
        self.updates = 0
        self.behaviour = EpsilonGreedyTable(self.q, hp.epsilon_at(0.0))

    def step_size(self) -> float:
        hp = self.hp
        assert isinstance(hp, TabularHParams)
        return scheduled_learning_rate(hp.schedule, hp.initial_learning_rate, self.updates,
                                       self.env_steps / self.spec.budget.total)

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return np.argmax(self.q[obs], axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {"q": torch.from_numpy(self.q.copy()), "updates": self.updates, "rl": self.rl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q[...] = state["q"].numpy()  # in place: the behaviour policy holds this array
        self.updates = int(state["updates"])
        self.load_rl_state(state["rl"])
