"""Seeds trained together (`resources.seeds_per_actor`; seedgroup.py has the group contract): PPO, A2C,
REINFORCE, DQN and DDPG.

Each seed stays an ordinary trainer (its member): its environments and their seeds, its action-noise and
minibatch generators, its observation normaliser and reward scaler, PPO's KL coefficient, DQN's replay
buffer, exploration schedule and target-update clock, its counters. A
batched group trains the members' networks stacked (`SeedStack`) and steps them as one:

  collect    every member's sampler steps in lockstep; each step's actions for all seeds come from one
             stacked policy call on each seed's own (normalised) observations and noise;
  estimate   values, log-probabilities and advantages (GAE, or REINFORCE's reward-to-go) for all seeds at
             once (N, T, E);
  update     the algorithm's own loss function (`ppo_minibatch_loss`, `policy_gradient_loss`,
             `dqn_minibatch_loss`, `ddpg_critic_loss`/`ddpg_actor_loss`), called with the stacked networks on
             every seed's batch (N, B, ...): it reduces over the sample axis only, so each seed's loss and
             gradient are its unbatched ones; gradient norms are clipped per seed, and `SeedAdam` or
             `SeedRMSprop` steps every seed with its own state, step count and learning rate.
  PPO        each seed draws its own minibatch order from its own generator; a seed that hits its
             `target_kl` early stop is masked out of the remaining epochs (it draws no more orders, as its
             unbatched self would not); with the KL penalty each seed's beta adapts to its own KL.
  DQN        epsilon-greedy per seed on one stacked Q call; each gradient step samples every seed's
             minibatch from its own buffer and steps all seeds at once; target networks stacked too.
  DDPG       the same with two stacked networks (actor, critic), two optimisers and two targets; each
             seed's exploration noise (its Ornstein-Uhlenbeck state) stays its own.

What it covers: vector (rank-1 Box) observations, MLP networks, Adam or RMSprop without weight
decay or momentum, no rollout workers, and the hyperparameters the algorithm's `AlgorithmInfo` lists
(`build` returns None otherwise, and the seeds train in turn). The
numbers agree with each seed trained alone up to float32 rounding of batched matmuls
(tests/algorithms/test_seed_groups.py measures it), not bit for bit.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch.utils._pytree import tree_map

from labfleet import metrics as M
from labfleet.algorithms import registry
from labfleet.algorithms.base import Trainer
from labfleet.algorithms.optim import scheduled_learning_rate
from labfleet.algorithms.rl.a2c import A2CTrainer
from labfleet.algorithms.rl.base import ActorCriticTrainer, RLTrainer
from labfleet.algorithms.rl.ddpg import DDPGTrainer, ddpg_actor_loss, ddpg_critic_loss
from labfleet.algorithms.rl.dqn import DQNTrainer, dqn_minibatch_loss
from labfleet.algorithms.rl.estimators import discounted_returns, gae_advantages
from labfleet.algorithms.rl.networks import GaussianPolicy, PolicyValue, categorical_terms, gaussian_terms, policy_kl
from labfleet.algorithms.rl.ppo import (
    PPOCoefficients,
    PPOMinibatch,
    PPOTrainer,
    adaptive_kl_coef,
    explained_variance,
    ppo_minibatch_loss,
)
from labfleet.algorithms.rl.reinforce import PolicyGradientBatch, ReinforceTrainer, policy_gradient_loss
from labfleet.algorithms.seedstack import SeedAdam, SeedRMSprop, SeedStack, _mlp_layers
from labfleet.rollout.sampler import VectorSampler


class StackedPart:
    """One network of every member, stacked, with its optimiser: the members' `ScheduledOptimizer`s
    (Adam or RMSprop) as one `SeedAdam` or `SeedRMSprop`, and each seed's current learning rate."""

    def __init__(self, modules: list[torch.nn.Module], optimizers: list[Any], hp: Any):
        self.stack = SeedStack(modules)
        self.names = [name for name, _ in modules[0].named_parameters()]  # the optimisers' order
        cfg = hp.optimizer
        params = [self.stack.params[name] for name in self.names]
        eps = cfg.eps if cfg.eps is not None else 1e-8
        self.opt: SeedAdam | SeedRMSprop = (SeedAdam(params, betas=cfg.betas, eps=eps) if cfg.type == "adam"
                                            else SeedRMSprop(params, alpha=cfg.alpha, eps=eps))
        for i, optimizer in enumerate(optimizers):
            state = optimizer.optimizer.state_dict()["state"]
            if state:
                self.opt.load_state_dict(i, state)
        self.lr = [optimizer.learning_rate for optimizer in optimizers]

    def step(self, loss: torch.Tensor, active: torch.Tensor, optimizers: list[Any | None], progress: list[float]
             ) -> torch.Tensor:
        """Each active seed's step on its own loss (N,) at its scheduled learning rate, with its own clipping
        norm, as its member's `ScheduledOptimizer.step` would (`optimizers[i]` None: a seed that left);
        norms before clipping."""
        self.stack.zero_grad()
        torch.where(active.to(loss.device), loss, torch.zeros_like(loss)).sum().backward()
        limits = [optimizer.hp.max_grad_norm if optimizer is not None else None for optimizer in optimizers]
        kept = {limit for limit, optimizer in zip(limits, optimizers, strict=True) if optimizer is not None}
        max_norm: float | torch.Tensor | None = next(iter(kept)) if len(kept) == 1 else torch.tensor(
            [math.inf if limit is None else limit for limit in limits], device=loss.device)
        norms = self.stack.clip_grad_norms_(max_norm)
        for i, optimizer in enumerate(optimizers):
            if optimizer is None or not active[i]:
                continue
            self.lr[i] = scheduled_learning_rate(optimizer.hp.schedule, optimizer.lr0, optimizer.updates,
                                                 progress[i])
            optimizer.updates += 1
        self.opt.step(torch.tensor(self.lr), active)
        return norms.detach()

    def sync(self, i: int, module: torch.nn.Module, optimizer: Any) -> None:
        """Seed i's stacked state into its member's network and `ScheduledOptimizer`."""
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.stack.params[name][i])
        torch_optimizer = optimizer.optimizer
        groups = torch_optimizer.state_dict()["param_groups"]
        for group in groups:
            group["lr"] = self.lr[i]
        torch_optimizer.load_state_dict({"state": self.opt.state_dict(i), "param_groups": groups})


class BatchedGroup:
    """Members of one trainer class whose networks are stacked (`PARTS`: (network attribute, optimiser
    attribute) of a member; the first part is also `self.stack`, `self.opt`, `self.lr`); subclasses check
    what they cover (`_covers`) and write `_iteration`."""

    batched = True
    trainer_class: type[RLTrainer]
    PARTS: tuple[tuple[str, str], ...] = ()
    algorithm: str  # its `AlgorithmInfo` declares the hyperparameters it takes per member and those it honours

    @classmethod
    def build(cls, members: dict[int, Trainer]) -> BatchedGroup | None:
        """A batched group of these trainers, or None where their spec is outside what it covers."""
        if not all(type(m) is cls.trainer_class for m in members.values()):
            return None
        first: Any = next(iter(members.values()))
        if not cls._honours(first.hp):
            return None
        space = first.observation_space
        if not (isinstance(space, gym.spaces.Box) and len(space.shape or ()) == 1):
            return None
        cfg = first.hp.optimizer
        if cfg.type not in ("adam", "rmsprop") or cfg.weight_decay or cfg.momentum \
                or first.spec.resources.rollout_workers or not cls._covers(first):
            return None
        shared = cls._shared(first)
        if any(cls._shared(member) != shared for member in members.values()):
            return None
        return cls(members)

    @classmethod
    def per_seed(cls) -> frozenset[str]:
        """The hyperparameters a member may hold its own value of (`AlgorithmInfo.per_seed_hparams`)."""
        return frozenset(registry.get(cls.algorithm).per_seed_hparams)

    @classmethod
    def _honours(cls, hp: Any) -> bool:
        """Whether every hyperparameter the group neither takes per member nor honours shared
        (`AlgorithmInfo.group_hparams`) has its default value: a new option is never ignored here."""
        known = cls.per_seed() | set(registry.get(cls.algorithm).group_hparams)
        return all(getattr(hp, name) == field.get_default(call_default_factory=True)
                   for name, field in type(hp).model_fields.items() if name not in known)

    @classmethod
    def _shared(cls, member: Any) -> tuple[Any, ...]:
        """What every member of a batched group has in common: its spec but its seed and the hyperparameters
        it may hold its own value of."""
        return (member.hp.model_dump(mode="json", exclude=set(cls.per_seed())),
                member.spec.model_dump(mode="json", exclude={"hparams", "seeds"}))

    @classmethod
    def _covers(cls, member: Any) -> bool:
        raise NotImplementedError

    @classmethod
    def _module(cls, member: Any) -> torch.nn.Module:
        """The member's network of the first part."""
        return getattr(member, cls.PARTS[0][0])

    def __init__(self, members: dict[int, Any]):
        self.members: dict[int, Any] = dict(members)
        self.seeds = list(members)  # stack index -> seed (a dropped seed keeps its index, masked)
        self.index = {seed: i for i, seed in enumerate(self.seeds)}
        first = members[self.seeds[0]]
        self.hp, self.spec, self.device = first.hp, first.spec, first.device  # shared but for `per_seed()`
        self.hps = {seed: member.hp for seed, member in members.items()}  # each seed's own (also once it left)
        self.parts = [StackedPart([getattr(members[seed], net) for seed in self.seeds],
                                  [getattr(members[seed], opt) for seed in self.seeds], self.hp)
                      for net, opt in self.PARTS]
        main = self.parts[0]
        self.stack, self.names, self.opt, self.lr = main.stack, main.names, main.opt, main.lr

    # --- the group contract ------------------------------------------------------------------------
    def live(self) -> list[int]:
        return [seed for seed, m in self.members.items() if not m.done]

    def drop(self, seed: int) -> None:
        trainer = self.members.pop(seed, None)
        if trainer is not None:
            trainer.close()

    def close(self) -> None:
        for trainer in self.members.values():
            trainer.close()
        self.members.clear()

    def sync(self) -> None:
        """Write each seed's stacked parameters, optimiser state and learning rate into its member."""
        for seed, member in self.members.items():
            for (net, opt), part in zip(self.PARTS, self.parts, strict=True):
                part.sync(self.index[seed], getattr(member, net), getattr(member, opt))

    def train_iteration(self) -> dict[int, dict[str, float] | BaseException]:
        live = self.live()
        if not live:
            return {}
        mask = torch.tensor([seed in live for seed in self.seeds])
        return dict(self._iteration(live, mask))

    def _iteration(self, live: list[int], mask: torch.Tensor) -> dict[int, dict[str, float]]:
        raise NotImplementedError

    def _column(self, name: str, dims: int = 0) -> float | torch.Tensor:
        """Each seed's `hparams.<name>` (one of `per_seed()`; inf where it is null): the one number when every
        seed has the same (the arithmetic is then each seed's alone, exactly), else a tensor (N,) with `dims`
        trailing axes of size 1, to broadcast against (N, ...)."""
        values = [math.inf if v is None else float(v) for v in (getattr(self.hps[seed], name) for seed in self.seeds)]
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=self.device).view(-1, *([1] * dims))

    def _step(self, loss: torch.Tensor, active: torch.Tensor, progress: dict[int, float], part: int = 0
              ) -> torch.Tensor:
        """Each active seed's optimiser step of network `part` on its own loss (N,); the gradient norms."""
        opt_name = self.PARTS[part][1]
        optimizers = [getattr(self.members[seed], opt_name) if seed in self.members else None for seed in self.seeds]
        return self.parts[part].step(loss, active, optimizers, [progress.get(seed, 0.0) for seed in self.seeds])

    def _lockstep(self, live: list[int], n_steps: int, behaviour: Any,
                  act: Any) -> dict[int, tuple[Any, dict[str, float]]]:
        """Every live seed's rollout of n_steps, its samplers stepped in lockstep: `behaviour(member)` is
        the member's own sampling policy (its noise), `act(x, noise)` the actions of all seeds at once from
        their encoded observations (N, E, d) and noise (N, E, k)."""
        samplers: dict[int, VectorSampler] = {}
        partial = {}
        for seed in live:
            member = self.members[seed]
            sampler = member.sampler(behaviour(member), self.hp.n_envs)
            assert isinstance(sampler, VectorSampler)
            samplers[seed] = sampler
            partial[seed] = sampler.begin(behaviour(member), n_steps)
        first = samplers[live[0]]
        obs = np.zeros((len(self.seeds), *first.obs.shape), dtype=first.obs.dtype)
        noise = np.zeros((len(self.seeds), *partial[live[0]].noise.shape[1:]), dtype=partial[live[0]].noise.dtype)
        rows = [self.index[seed] for seed in live]
        with torch.inference_mode():
            for t in range(n_steps):
                for seed, row in zip(live, rows, strict=True):
                    obs[row], noise[row] = samplers[seed].obs, partial[seed].noise[t]
                x = self._encode(torch.as_tensor(obs, device=self.device))
                actions = act(x, noise)
                for seed, row in zip(live, rows, strict=True):
                    samplers[seed].step(partial[seed], t, actions[row])
        result = {}
        for seed in live:
            rollout = partial[seed].finish()
            result[seed] = (rollout, self.members[seed].account(rollout))
        return result

    def _replay_batch(self, learners: list[int]) -> dict[str, torch.Tensor]:
        """One minibatch from each learner's own replay buffer (its own generator; rewards as its learner
        sees them), stacked (N, B, ...); zeros for the other seeds."""
        batches = {seed: self.members[seed].buffer.sample(self.hp.batch_size, self.device) for seed in learners}
        for seed, batch in batches.items():
            batch["rewards"] = self.members[seed].scale_rewards(batch["rewards"])
        any_batch = batches[learners[0]]
        return {name: torch.stack([batches[seed][name] if seed in batches else torch.zeros_like(value)
                                   for seed in self.seeds]) for name, value in any_batch.items()}

    def _encode(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (N, B, d) raw -> what each seed's encoder gives (its own normaliser, if any)."""
        x = obs.float()
        norms = [m.obs_normalizer if (m := self.members.get(seed)) is not None else None for seed in self.seeds]
        if all(norm is None for norm in norms):
            return x
        return torch.stack([norm(x[i]) if norm is not None else x[i] for i, norm in enumerate(norms)])

    def _targets(self, part: int, target: str) -> dict[str, torch.Tensor]:
        """The members' target copies of network `part` (attribute `target`), stacked (no gradient)."""
        names = self.parts[part].names
        with torch.no_grad():
            return {name: torch.stack([dict(getattr(self.members[seed], target).named_parameters())[name].detach()
                                       for seed in self.seeds]).clone() for name in names}

    def _sync_targets(self, part: int, target: str, stacked: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for seed, member in self.members.items():
                for name, param in getattr(member, target).named_parameters():
                    param.copy_(stacked[name][self.index[seed]])

    def _polyak(self, part: int, stacked: dict[str, torch.Tensor], seeds: list[int]) -> None:
        """theta_targ <- tau theta + (1 - tau) theta_targ for these seeds, each with its own `hparams.tau`
        (as `polyak_update` on each)."""
        params = self.parts[part].stack.params
        taus = {self.hps[seed].tau for seed in seeds}
        with torch.no_grad():
            if len(seeds) == len(self.seeds) and len(taus) == 1:
                torch._foreach_lerp_([stacked[n] for n in stacked], [params[n] for n in stacked], taus.pop())
                return
            for seed in seeds:
                i = self.index[seed]
                for name, target in stacked.items():
                    target[i].lerp_(params[name][i], self.hps[seed].tau)


class BatchedActorCritic(BatchedGroup):
    """REINFORCE, A2C, PPO: the members' `ActorCritic` networks, stacked."""

    trainer_class: type[ActorCriticTrainer]
    PARTS = (("ac", "optimizer"),)

    @classmethod
    def _covers(cls, member: Any) -> bool:
        encoder = member.ac.policy.encoder
        policy_net = member.ac.policy.mean if isinstance(member.ac.policy, GaussianPolicy) else member.ac.policy.logits
        return (encoder.plain and _mlp_layers(policy_net) is not None
                and _mlp_layers(member.ac.value_net) is not None)

    def __init__(self, members: dict[int, Any]):
        super().__init__(members)
        first = members[self.seeds[0]]
        self.gaussian = isinstance(first.ac.policy, GaussianPolicy)
        self.policy_prefix = "policy.mean." if self.gaussian else "policy.logits."
        policy: Any = first.ac.policy
        self.policy_net: torch.nn.Module = policy.mean if self.gaussian else policy.logits
        self.value_net: torch.nn.Module = first.ac.value_net

    def _collect(self, live: list[int]) -> dict[int, tuple[Any, dict[str, float]]]:
        """Every live seed's rollout, with one stacked policy call per step."""
        def act(x: torch.Tensor, noise: np.ndarray) -> np.ndarray:
            out = self._policy_out(x)
            noise_t = torch.as_tensor(noise, device=self.device)
            actions = (out + self._log_std().exp() * noise_t if self.gaussian
                       else torch.argmax(out + noise_t, dim=-1))
            return actions.cpu().numpy()

        return self._lockstep(live, self.hp.n_steps, lambda member: member.actor, act)

    def _rollouts(self, live: list[int]) -> tuple[dict[int, tuple[Any, dict[str, float]]], dict[str, torch.Tensor]]:
        """Collect, then the rollouts as stacked tensors (N, T, E, ...), zeros for seeds not live."""
        collected = self._collect(live)
        any_rollout = collected[live[0]][0]
        out = {}
        for name in ("obs", "actions", "next_obs", "terminated", "truncated"):
            arrays = [getattr(collected[seed][0], name) if seed in collected
                      else np.zeros_like(getattr(any_rollout, name)) for seed in self.seeds]
            out[name] = torch.as_tensor(np.stack(arrays), device=self.device)
        T, E = any_rollout.rewards.shape
        out["rewards"] = torch.stack([  # as each member's learner sees them (scaled, with normalize.reward)
            self.members[seed].scale_rewards(torch.as_tensor(collected[seed][0].rewards, device=self.device))
            if seed in collected else torch.zeros(T, E, device=self.device) for seed in self.seeds])
        return collected, out

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        """(N, T, E, ...) -> (N, T * E, ...), time-major as the unbatched trainers flatten (T, E)."""
        return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])

    @staticmethod
    def _time_first(t: torch.Tensor) -> torch.Tensor:
        """(N, T, E) -> (T, N, E): the estimators run along the first axis, elementwise along the rest."""
        return t.transpose(0, 1)

    # --- the networks, stacked ---------------------------------------------------------------------
    def _policy_out(self, x: torch.Tensor) -> torch.Tensor:
        """The policy's logits or means for x (N, E, d) encoded: the rollout's per-step call."""
        return self.stack.mlp(self.policy_prefix, self.policy_net, x)

    def _log_std(self) -> torch.Tensor:
        return self.stack.params["policy.log_std"].unsqueeze(1)  # (N, 1, A)

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        """Every seed's V(s) for x (N, B, d) encoded: what the estimates need of the networks alone."""
        return self.stack.mlp("value_net.", self.value_net, x).squeeze(-1)

    def _evaluate(self, x: torch.Tensor, actions: torch.Tensor,
                  params: dict[str, torch.Tensor] | None = None) -> PolicyValue:
        """Every seed's `ActorCritic` call at once, on x (N, B, d) encoded (each seed's own normaliser applied)
        and actions (N, B, ...): the stacked networks (or `params`, pi_old's) and the policy's own terms."""
        p = self.stack.params if params is None else params
        out = self.stack.mlp(self.policy_prefix, self.policy_net, x, p)
        logp, entropy, dist = (gaussian_terms(out, p["policy.log_std"].unsqueeze(1), actions) if self.gaussian
                               else categorical_terms(out, actions))
        return PolicyValue(logp, entropy, self.stack.mlp("value_net.", self.value_net, x, p).squeeze(-1), dist)


class BatchedPPO(BatchedActorCritic):
    trainer_class = PPOTrainer
    algorithm = "ppo"

    def _iteration(self, live: list[int], mask: torch.Tensor) -> dict[int, dict[str, float]]:
        hp, members, device = self.hp, self.members, self.device
        n = len(self.seeds)
        progress = {seed: members[seed].env_steps / members[seed].spec.budget.total for seed in live}
        clip = torch.tensor([self.hps[seed].clip_at(progress.get(seed, 0.0)) for seed in self.seeds], device=device)
        collected, r = self._rollouts(live)
        x, b_actions = self._encode(self._flat(r["obs"])), self._flat(r["actions"])
        T, E = r["rewards"].shape[1:]
        with torch.no_grad():
            pi_old = self._evaluate(x, b_actions)
            b_values, b_logp_old = pi_old.value, pi_old.logp  # (N, B) each
            next_values = self._value(self._encode(self._flat(r["next_obs"])))
            tf = self._time_first
            adv = gae_advantages(tf(r["rewards"]), tf(b_values.reshape(n, T, E)), tf(r["terminated"]),
                                 tf(r["truncated"]), tf(next_values.reshape(n, T, E)), self._column("gamma", 1),
                                 self._column("gae_lambda", 1))
            b_adv = self._time_first(adv).reshape(n, T * E)
            b_returns = b_adv + b_values

        old_params = ({k: v.detach().clone() for k, v in self.stack.params.items()}
                      if hp.loss == "kl_penalty" else None)
        beta = torch.tensor([members[s].kl_coef if s in members else 0.0 for s in self.seeds], device=device)
        active = mask.clone()
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("pi", "v", "ent", "kl", "clip", "norm", "on")}
        B = T * E
        epochs = torch.tensor([self.hps[seed].n_epochs for seed in self.seeds])
        target_kl = self._column("target_kl")
        for epoch in range(int(epochs.max())):
            active &= epoch < epochs  # a seed past its own n_epochs draws no more orders, as alone
            if not active.any():
                break
            orders = torch.stack([
                torch.randperm(B, generator=members[seed].shuffle) if active[i] else torch.arange(B)
                for i, seed in enumerate(self.seeds)]).to(device)
            for start in range(0, B, hp.batch_size):
                mb = orders[:, start:start + hp.batch_size]  # (N, b)
                self._minibatch(mb, x, b_actions, b_logp_old, b_adv, b_returns, b_values, clip, beta,
                                old_params, active, progress, stats)
            active &= ~(stats["kl"][-1].cpu() > 1.5 * (target_kl.cpu() if isinstance(target_kl, torch.Tensor)
                                                       else target_kl))  # (no target_kl: inf)
        return self._log(live, collected, stats, b_values, b_returns, x, b_actions, old_params)

    def _minibatch(self, mb: torch.Tensor, x: torch.Tensor, b_actions: torch.Tensor, b_logp_old: torch.Tensor,
                   b_adv: torch.Tensor, b_returns: torch.Tensor, b_values: torch.Tensor, clip: torch.Tensor,
                   beta: torch.Tensor, old_params: dict[str, torch.Tensor] | None, active: torch.Tensor,
                   progress: dict[int, float], stats: dict[str, list[torch.Tensor]]) -> None:
        """One minibatch step of every active seed, each on PPO's own `ppo_minibatch_loss`. When only some
        seeds are active (the others stopped early, ran their own fewer epochs, or left the group), only
        those compute: their rows of the data and of the stacked parameters are taken (the gradient flows
        back into the stack through the indexing)."""
        n = len(self.seeds)

        def take(t: torch.Tensor) -> torch.Tensor:
            index = mb.view(*mb.shape, *([1] * (t.dim() - 2))).expand(*mb.shape, *t.shape[2:])
            return torch.gather(t, 1, index)

        batch = PPOMinibatch(*(take(t) for t in (x, b_actions, b_logp_old, b_adv, b_returns, b_values)))
        coef = PPOCoefficients(clip, beta, self._column("vf_coef"), self._column("ent_coef"))
        params, old = self.stack.params, old_params
        rows = None if bool(active.all()) else active.nonzero().squeeze(1).to(x.device)
        if rows is not None:
            def pick(t: Any) -> Any:
                return t.index_select(0, rows) if isinstance(t, torch.Tensor) and t.dim() > 0 else t

            batch, coef, params, old = tree_map(pick, (batch, coef, params, old))
        net = partial(self._evaluate, params=params)
        old_net = partial(self._evaluate, params=old) if old is not None else None
        loss, out = ppo_minibatch_loss(net, old_net, batch, coef, self.hp)
        if rows is not None:  # each seed's row again (zeros for the seeds that did not compute)
            loss = loss.new_zeros(n).index_copy(0, rows, loss)
            out = {k: v.new_zeros(n).index_copy(0, rows, v) for k, v in out.items()}
        norms = self._step(loss, active, progress)
        for key, value in out.items():
            stats[key].append(value)
        stats["norm"].append(norms)
        stats["on"].append(active.to(loss.device).float())

    def _log(self, live: list[int], collected: dict[int, tuple[Any, dict[str, float]]],
             stats: dict[str, list[torch.Tensor]], b_values: torch.Tensor, b_returns: torch.Tensor,
             x: torch.Tensor, actions: torch.Tensor, old_params: dict[str, torch.Tensor] | None
             ) -> dict[int, dict[str, float]]:
        on = torch.stack(stats["on"])  # (M, N): which minibatches each seed took part in
        count = on.sum(0).clamp(min=1)
        means = {k: ((torch.stack(v) * on).sum(0) / count).tolist() for k, v in stats.items() if k != "on"}
        kl_after = None
        if old_params is not None:
            with torch.no_grad():
                kl_after = policy_kl(self._evaluate(x, actions, old_params).dist,
                                     self._evaluate(x, actions).dist).mean(-1).tolist()
        out = {}
        for seed in live:
            i, member = self.index[seed], self.members[seed]
            logged = collected[seed][1]
            member.iterations += 1
            if kl_after is not None:
                logged[M.PPO_KL] = kl_after[i]
                logged[M.PPO_KL_COEF] = member.kl_coef
                member.kl_coef = adaptive_kl_coef(member.kl_coef, kl_after[i], self.hps[seed].kl_target)
            logged.update({
                M.LOSS_POLICY: means["pi"][i], M.LOSS_VALUE: means["v"][i], M.LOSS_ENTROPY: means["ent"][i],
                M.PPO_APPROX_KL: means["kl"][i], M.PPO_CLIP_FRACTION: means["clip"][i],
                M.GRAD_NORM: means["norm"][i],
                M.PPO_EXPLAINED_VARIANCE: explained_variance(b_values[i], b_returns[i]),
                M.LEARNING_RATE: self.lr[i],
            })
            out[seed] = logged
        return out


class BatchedPolicyGradient(BatchedActorCritic):
    """A2C and REINFORCE: one gradient step per rollout on -mean(log pi * A) + vf_coef * value loss -
    ent_coef * entropy; they differ in the advantage (`_advantages`)."""

    def _advantages(self, r: dict[str, torch.Tensor], values: torch.Tensor, next_values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns), each (N, T, E), without gradient."""
        raise NotImplementedError

    def _iteration(self, live: list[int], mask: torch.Tensor) -> dict[int, dict[str, float]]:
        hp, members = self.hp, self.members
        n = len(self.seeds)
        collected, r = self._rollouts(live)
        # (after the rollout, as A2C and REINFORCE alone step their schedules)
        progress = {seed: members[seed].env_steps / members[seed].spec.budget.total for seed in live}
        T, E = r["rewards"].shape[1:]
        x, actions = self._encode(self._flat(r["obs"])), self._flat(r["actions"])
        with torch.no_grad():
            values = self._value(x).reshape(n, T, E)
            next_values = self._value(self._encode(self._flat(r["next_obs"]))).reshape(n, T, E)
            adv, returns = self._advantages(r, values, next_values)
        batch = PolicyGradientBatch(x, actions, adv.reshape(n, T * E), returns.reshape(n, T * E))
        loss, terms = policy_gradient_loss(self._evaluate, batch, self._column("vf_coef"), self._column("ent_coef"),
                                           hp.normalize_advantage)
        norms = self._step(loss, mask, progress)
        rows = {k: v.tolist() for k, v in (*terms.items(), ("norm", norms))}
        out = {}
        for seed in live:
            i, logged = self.index[seed], collected[seed][1]
            members[seed].iterations += 1
            logged.update({M.LOSS_POLICY: rows["pi"][i], M.LOSS_VALUE: rows["v"][i], M.LOSS_ENTROPY: rows["ent"][i],
                           M.GRAD_NORM: rows["norm"][i], M.LEARNING_RATE: self.lr[i]})
            out[seed] = logged
        return out


class BatchedA2C(BatchedPolicyGradient):
    trainer_class = A2CTrainer
    algorithm = "a2c"

    def _advantages(self, r: dict[str, torch.Tensor], values: torch.Tensor, next_values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        tf = self._time_first
        adv = tf(gae_advantages(tf(r["rewards"]), tf(values), tf(r["terminated"]), tf(r["truncated"]),
                                tf(next_values), self._column("gamma", 1), self._column("gae_lambda", 1)))
        return adv, adv + values


class BatchedReinforce(BatchedPolicyGradient):
    trainer_class = ReinforceTrainer
    algorithm = "reinforce"

    def _advantages(self, r: dict[str, torch.Tensor], values: torch.Tensor, next_values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        tf = self._time_first
        returns = tf(discounted_returns(tf(r["rewards"]), tf(r["terminated"]), tf(r["truncated"]), tf(next_values),
                                        self._column("gamma", 1)))
        return returns - values, returns


class BatchedDQN(BatchedGroup):
    """DQN's seeds stacked: each keeps its replay buffer (and its sampling generator), its exploration
    schedule, its target network (stacked too) and its target-update clock; a training phase's gradient
    steps run once for all seeds on each seed's own minibatch."""

    trainer_class = DQNTrainer
    algorithm = "dqn"
    PARTS = (("q_net", "optimizer"),)

    @classmethod
    def _covers(cls, member: Any) -> bool:
        encoder = member.q_net.encoder
        return encoder.plain and _mlp_layers(member.q_net.q) is not None

    def __init__(self, members: dict[int, Any]):
        super().__init__(members)
        self.q_module: torch.nn.Module = members[self.seeds[0]].q_net.q
        self.target = self._targets(0, "q_target")

    def sync(self) -> None:
        super().sync()
        self._sync_targets(0, "q_target", self.target)

    def _q(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Every seed's Q values for x (N, B, d) encoded (with `params`: the target networks')."""
        return self.stack.mlp("q.", self.q_module, x, params)

    def _iteration(self, live: list[int], mask: torch.Tensor) -> dict[int, dict[str, float]]:
        hp, members = self.hp, self.members
        progress = {seed: members[seed].env_steps / members[seed].spec.budget.total for seed in live}
        epsilon = np.ones(len(self.seeds))
        for seed in live:  # 1. collect, epsilon-greedy (uniformly random until learning_starts)
            member = members[seed]
            learning = member.env_steps >= hp.learning_starts
            member.behaviour.epsilon = self.hps[seed].epsilon_at(progress[seed]) if learning else 1.0
            epsilon[self.index[seed]] = member.behaviour.epsilon
        n_actions = members[live[0]].behaviour.n_actions

        def act(x: torch.Tensor, uniforms: np.ndarray) -> np.ndarray:  # as EpsilonGreedyNet, per seed
            explore = uniforms[..., 0] < epsilon[:, None]
            random_actions = np.minimum((uniforms[..., 1] * n_actions).astype(np.int64), n_actions - 1)
            if explore.all():
                return random_actions
            return np.where(explore, random_actions, self._q(x).argmax(dim=-1).cpu().numpy())

        collected = self._lockstep(live, hp.train_freq, lambda member: member.behaviour, act)
        out = {}
        for seed in live:
            members[seed].buffer.add_rollout(collected[seed][0])
            out[seed] = collected[seed][1]
            out[seed][M.DQN_EPSILON] = members[seed].behaviour.epsilon
        learners = [seed for seed in live if members[seed].env_steps >= hp.learning_starts]
        if learners:  # 2. gradient steps, each seed on a minibatch of its own buffer
            self._train(learners, progress, out)
        due = [seed for seed in live  # 3. target networks
               if members[seed].env_steps - members[seed].last_target_update >= self.hps[seed].target_update_interval]
        if due:
            self._polyak(0, self.target, due)
        for seed in live:
            if seed in due:
                members[seed].last_target_update = members[seed].env_steps
            members[seed].iterations += 1
        return out

    def _train(self, learners: list[int], progress: dict[int, float], out: dict[int, dict[str, float]]) -> None:
        hp = self.hp
        active = torch.tensor([seed in learners for seed in self.seeds])
        losses, q_means = [], []
        for _ in range(hp.gradient_steps):
            batch = self._replay_batch(learners)
            batch["obs"], batch["next_obs"] = self._encode(batch["obs"]), self._encode(batch["next_obs"])
            loss, q_avg = dqn_minibatch_loss(self._q, partial(self._q, params=self.target), batch,
                                             self._column("gamma", 1), hp)
            self._step(loss, active, progress)
            losses.append(loss.detach())
            q_means.append(q_avg)
        loss_mean, q_mean = torch.stack(losses).mean(0).tolist(), torch.stack(q_means).mean(0).tolist()
        for seed in learners:
            i = self.index[seed]
            out[seed].update({M.LOSS_VALUE: loss_mean[i], M.Q_MEAN: q_mean[i], M.LEARNING_RATE: self.lr[i]})


class BatchedDDPG(BatchedGroup):
    """DDPG's seeds stacked: actors and critics (and their targets) stacked, each with its optimiser; each
    seed keeps its replay buffer, its exploration noise (its Ornstein-Uhlenbeck state) and its clock."""

    trainer_class = DDPGTrainer
    algorithm = "ddpg"
    PARTS = (("actor", "actor_optimizer"), ("critic", "critic_optimizer"))

    @classmethod
    def _covers(cls, member: Any) -> bool:
        encoders = (member.actor.encoder, member.critic.encoder)
        return (all(e.plain for e in encoders) and _mlp_layers(member.actor.mu) is not None
                and _mlp_layers(member.critic.q) is not None)

    def __init__(self, members: dict[int, Any]):
        super().__init__(members)
        first = members[self.seeds[0]]
        self.mu_module: torch.nn.Module = first.actor.mu
        self.q_module: torch.nn.Module = first.critic.q
        self.low, self.high = first.actor.low, first.actor.high  # the one action box of every seed
        self.actor_target = self._targets(0, "actor_target")
        self.critic_target = self._targets(1, "critic_target")

    def sync(self) -> None:
        super().sync()
        self._sync_targets(0, "actor_target", self.actor_target)
        self._sync_targets(1, "critic_target", self.critic_target)

    def _actor(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Every seed's mu(s) for x (N, B, d) encoded (with `params`: the target actors')."""
        squashed = torch.tanh(self.parts[0].stack.mlp("mu.", self.mu_module, x, params))
        return self.low + (squashed + 1.0) * 0.5 * (self.high - self.low)

    def _critic(self, x: torch.Tensor, actions: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Every seed's Q(s, a) for x (N, B, d) encoded (with `params`: the target critics')."""
        return self.parts[1].stack.mlp("q.", self.q_module, torch.cat([x, actions], dim=-1), params).squeeze(-1)

    def _iteration(self, live: list[int], mask: torch.Tensor) -> dict[int, dict[str, float]]:
        hp, members = self.hp, self.members
        progress = {seed: members[seed].env_steps / members[seed].spec.budget.total for seed in live}
        for seed in live:
            members[seed].behaviour.random = members[seed].env_steps < hp.learning_starts
        rows = {self.index[seed]: members[seed].behaviour for seed in live}

        def act(x: torch.Tensor, uniforms: np.ndarray) -> np.ndarray:  # as each member's NoisyActor
            mu = None if all(b.random for b in rows.values()) else self._actor(x).cpu().numpy()
            actions = []
            for i in range(len(self.seeds)):
                behaviour = rows.get(i)
                if behaviour is None:
                    actions.append(np.zeros_like(uniforms[i]))
                elif behaviour.random:
                    actions.append((behaviour.low + uniforms[i] * (behaviour.high - behaviour.low)).astype(np.float32))
                else:
                    assert mu is not None
                    half_range = 0.5 * (behaviour.high - behaviour.low)
                    actions.append(np.clip(mu[i] + behaviour.noise(uniforms[i]) * half_range, behaviour.low,
                                           behaviour.high))
            return np.stack([a.astype(actions[min(rows)].dtype) for a in actions])

        collected = self._lockstep(live, hp.train_freq, lambda member: member.behaviour, act)
        out = {}
        for seed in live:
            members[seed].buffer.add_rollout(collected[seed][0])
            out[seed] = collected[seed][1]
        learners = [seed for seed in live if members[seed].env_steps >= hp.learning_starts]
        if learners:
            self._train(learners, progress, out)
        for seed in live:
            members[seed].iterations += 1
        return out

    def _train(self, learners: list[int], progress: dict[int, float], out: dict[int, dict[str, float]]) -> None:
        hp = self.hp
        active = torch.tensor([seed in learners for seed in self.seeds])
        critic_losses, actor_losses, q_means = [], [], []
        gamma = self._column("gamma", 1)  # (N, 1)
        for _ in range(hp.gradient_steps):
            b = self._replay_batch(learners)
            b["obs"], b["next_obs"] = self._encode(b["obs"]), self._encode(b["next_obs"])
            critic_loss, q_mean = ddpg_critic_loss(self._critic, partial(self._actor, params=self.actor_target),
                                                   partial(self._critic, params=self.critic_target), b, gamma)
            self._step(critic_loss, active, progress, part=1)
            actor_loss = ddpg_actor_loss(self._actor, self._critic, b)
            self._step(actor_loss, active, progress, part=0)
            self._polyak(0, self.actor_target, learners)
            self._polyak(1, self.critic_target, learners)
            critic_losses.append(critic_loss.detach())
            actor_losses.append(actor_loss.detach())
            q_means.append(q_mean)
        means = [torch.stack(v).mean(0).tolist() for v in (critic_losses, actor_losses, q_means)]
        for seed in learners:
            i = self.index[seed]
            out[seed].update({M.LOSS_VALUE: means[0][i], M.LOSS_POLICY: means[1][i], M.DDPG_Q_MEAN: means[2][i],
                              M.LEARNING_RATE: self.parts[0].lr[i]})
