"""PPO's update for small MLP actor-critics with a hand-written backward pass.

For a 64x64 MLP on a 256-sample minibatch, autograd's graph building and per-op dispatch cost more than
the arithmetic (cProfile of a PPO trainer: `run_backward` alone is a quarter of its CPU; docs/benchmarks.md).
This module computes the gradient of the same loss (`ppo.ppo_minibatch_loss`, the definition and the test
oracle) in closed form, through the activations the forward pass keeps:

  loss   = -mean(min(r A, clip(r, 1 - eps, 1 + eps) A)) + vf_coef L_value - ent_coef mean(H)
  r      = exp(log pi(a|s) - log pi_old(a|s))
  d/dlogits (categorical):   dlogp = onehot(a) - p          dH = -p (log p + H)
  d/dmean, d/dlog_std (diagonal Gaussian, state-independent log_std):
                             dlogp = (z / std, z^2 - 1)     dH = (0, 1)      z = (a - mean) / std
  Linear y = x W^T + b:      dW = dy^T x,  db = sum(dy),  dx = dy W
  tanh:  dz = dh (1 - h^2)   relu:  dz = dh [h > 0]    (autograd's own kernels for both)

Where torch's min, max and clamp split or mask a gradient at a tie or a bound, the same is done here, so
the gradients equal autograd's up to floating-point summation order (tests/algorithms/test_fastmlp.py: the
gradients on a minibatch within 1e-5, the parameters after two whole iterations within 1e-4). The optimiser
step (learning-rate schedule, gradient clipping, Adam) is the trainer's own `ScheduledOptimizer`; the
parameters are the network's, so checkpoints are the same either way.

It covers what it is written for, and `FastPPOUpdate.why_not` says why a trainer does not qualify: the
clipped objective, a categorical or diagonal Gaussian policy, MLPs of Linear layers with tanh or ReLU, an
observation encoder without trainable parameters (vectors, one-hots, normalised vectors). Everything else
(the KL penalty, CNNs, users' encoders) keeps autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from labfleet.algorithms.rl.networks import CategoricalPolicy, GaussianPolicy, standardised


class MLPKernel:
    """Forward with kept activations, and backward, of an `nn.Sequential` of Linear layers each followed
    (but the last) by tanh or ReLU, on its own parameters."""

    def __init__(self, net: nn.Sequential):
        self.linears: list[nn.Linear] = []
        self.activations: list[str] = []
        for layer in net:
            if isinstance(layer, nn.Linear):
                self.linears.append(layer)
            else:
                self.activations.append("tanh" if isinstance(layer, nn.Tanh) else "relu")

    @staticmethod
    def supports(net: nn.Module) -> bool:
        if not isinstance(net, nn.Sequential) or len(net) == 0:
            return False
        kinds = [type(layer) for layer in net]
        linear_at = kinds[0::2]
        activation_at = kinds[1::2]
        return (len(kinds) % 2 == 1 and all(k is nn.Linear for k in linear_at)
                and all(k in (nn.Tanh, nn.ReLU) for k in activation_at))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output and the inputs of every Linear layer (x, then each hidden activation)."""
        kept = [x]
        h = x
        for i, linear in enumerate(self.linears):
            h = torch.addmm(linear.bias, h, linear.weight.t())
            if i < len(self.activations):
                h = torch.tanh(h) if self.activations[i] == "tanh" else torch.relu(h)
                kept.append(h)
        return h, kept

    def backward(self, kept: list[torch.Tensor], grad_out: torch.Tensor) -> None:
        """Accumulate d loss / d parameters into each parameter's `.grad`, from d loss / d output."""
        dz = grad_out
        for i in range(len(self.linears) - 1, -1, -1):
            linear, x = self.linears[i], kept[i]
            _accumulate(linear.weight, dz.t().mm(x))
            _accumulate(linear.bias, dz.sum(0))
            if i == 0:
                break
            h = kept[i]
            dh = dz.mm(linear.weight)
            # autograd's own kernels for these two: dh (1 - h^2), and dh where h > 0
            dz = torch.ops.aten.tanh_backward(dh, h) if self.activations[i - 1] == "tanh" \
                else torch.ops.aten.threshold_backward(dh, h, 0)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _min_weights(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How torch.min(a, b) passes a gradient to a and to b: 1 to the smaller, 1/2 to each at a tie."""
    tie = (a == b).to(a.dtype) * 0.5
    return (a < b).to(a.dtype) + tie, (b < a).to(a.dtype) + tie


class _ActorCriticKernel:
    """The forward pass of an `ActorCritic` (log pi(a|s), H[pi(.|s)], V(s), with the activations kept), and
    the backward pass from d loss / d log pi(a|s), d loss / d V(s) and the entropy bonus's weight."""

    def __init__(self, ac: nn.Module):
        self.ac = ac
        policy: Any = ac.policy
        self.gaussian = isinstance(policy, GaussianPolicy)
        self.policy_net = MLPKernel(policy.mean if self.gaussian else policy.logits)
        self.value_net = MLPKernel(ac.value_net)  # type: ignore[arg-type]
        self.params = list(ac.parameters())

    @staticmethod
    def why_not_networks(ac: nn.Module) -> str | None:
        policy = getattr(ac, "policy", None)
        if not isinstance(policy, (CategoricalPolicy, GaussianPolicy)):
            return f"policy {type(policy).__name__}"
        if any(p.requires_grad for p in policy.encoder.parameters()):
            return "an observation encoder with parameters"
        head = policy.mean if isinstance(policy, GaussianPolicy) else policy.logits
        if not (MLPKernel.supports(head) and MLPKernel.supports(ac.value_net)):  # type: ignore[arg-type]
            return "networks other than Linear layers with tanh or ReLU"
        return None

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, Any]:
        """log pi(a|s), H and V(s) of each sample, and what the backward pass needs (call under no_grad)."""
        policy: Any = self.ac.policy
        x = policy.encoder(obs)
        head, head_kept = self.policy_net.forward(x)
        value, value_kept = self.value_net.forward(x)
        out: dict[str, Any] = {"head_kept": head_kept, "value": value.squeeze(-1), "value_kept": value_kept,
                               "actions": actions}
        if self.gaussian:
            log_std = policy.log_std.expand_as(head)
            std = log_std.exp()
            z = (actions - head) / std
            out.update(std=std, z=z, logp=(-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1),
                       entropy=(0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1))
        else:
            logp_all = torch.log_softmax(head, dim=-1)
            probs = logp_all.exp()
            out.update(logp_all=logp_all, probs=probs,
                       logp=logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1),
                       entropy=-(probs * logp_all).sum(-1))
        return out

    def backward(self, f: dict[str, Any], g_logp: torch.Tensor, g_value: torch.Tensor, ent_coef: Any) -> None:
        """Set the parameters' gradients of a loss whose gradient is `g_logp` per log pi(a|s) and `g_value`
        per V(s), minus `ent_coef` times the mean entropy."""
        policy: Any = self.ac.policy
        for p in self.params:
            p.grad = None
        n = g_logp.shape[0]
        g_entropy = -ent_coef / n  # d loss / d H(s), each sample
        if self.gaussian:
            z, std = f["z"], f["std"]
            g_mean = g_logp.unsqueeze(-1) * z / std
            g_log_std = (g_logp.unsqueeze(-1) * (z * z - 1)).sum(0) + g_entropy * n
            self.policy_net.backward(f["head_kept"], g_mean)
            _accumulate(policy.log_std, g_log_std.reshape(policy.log_std.shape))
        else:
            probs, logp_all = f["probs"], f["logp_all"]
            onehot = torch.zeros_like(probs).scatter_(-1, f["actions"].long().unsqueeze(-1), 1.0)
            g_logits = g_logp.unsqueeze(-1) * (onehot - probs) \
                + g_entropy * (-probs * (logp_all + f["entropy"].unsqueeze(-1)))
            self.policy_net.backward(f["head_kept"], g_logits)
        self.value_net.backward(f["value_kept"], g_value.unsqueeze(-1))


class FastPPOUpdate(_ActorCriticKernel):
    """The gradient of `ppo_minibatch_loss` for one trainer's actor-critic, in closed form."""

    @staticmethod
    def why_not(ac: nn.Module, hp: Any) -> str | None:
        """Why this trainer's update needs autograd, or None when this kernel computes it."""
        if hp.loss != "clip":
            return f"loss {hp.loss}"
        return _ActorCriticKernel.why_not_networks(ac)

    def gradients(self, batch: Any, coef: Any, hp: Any) -> dict[str, torch.Tensor]:
        """Set every parameter's `.grad` to d loss / d parameter on `batch` (a `PPOMinibatch`), and return
        the minibatch's statistics as `ppo_minibatch_loss` gives them."""
        with torch.no_grad():
            f = self.forward(batch.obs, batch.actions)
            value, logp = f["value"], f["logp"]
            n = value.shape[0]
            logratio = logp - batch.logp_old
            ratio = logratio.exp()
            a = standardised(batch.advantages) if hp.normalize_advantage else batch.advantages
            clip = coef.clip
            clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
            surr1, surr2 = ratio * a, clipped * a
            loss_pi = -torch.min(surr1, surr2).mean(-1)
            # d loss_pi / d log pi(a|s). torch.min passes the gradient to the smaller term, half to each at a
            # tie, and the clipped term passes it only where r lies within the bounds. A tie with r within
            # them gives A (a half from each term); r outside them makes the clipped term the smaller only
            # where the gradient through it is 0 (or A = 0): so the weight is [r A <= clip(r) A], exactly.
            g_logp = -(a * (surr1 <= surr2).to(a.dtype)) / n * ratio

            d = value - batch.returns
            if hp.clip_range_vf is None:
                loss_v = (d ** 2).mean(-1)
                g_value = 2 * d / n
            else:
                c = hp.clip_range_vf
                value_clipped = batch.values_old + torch.clamp(value - batch.values_old, -c, c)
                dc = value_clipped - batch.returns
                loss_v = torch.max(d ** 2, dc ** 2).mean(-1)
                v1, v2 = _min_weights(-(d ** 2), -(dc ** 2))  # max(x, y) = -min(-x, -y)
                in_range = ((value - batch.values_old >= -c) & (value - batch.values_old <= c)).to(d.dtype)
                g_value = (v1 * 2 * d + v2 * 2 * dc * in_range) / n
            self.backward(f, g_logp, coef.vf_coef * g_value, coef.ent_coef)
            # http://joschu.net/blog/kl-approx.html
            return {"kl": ((ratio - 1) - logratio).mean(-1), "clip": ((ratio - 1).abs() > clip).float().mean(-1),
                    "pi": loss_pi, "v": loss_v, "ent": f["entropy"].mean(-1)}


class FastPolicyGradientUpdate(_ActorCriticKernel):
    """The gradient of `policy_gradient_loss` (REINFORCE's and A2C's) in closed form:

      loss = -mean(log pi(a|s) A) + vf_coef mean((V(s) - R)^2) - ent_coef mean(H)
      d loss / d log pi(a|s) = -A / B      d loss / d V(s) = 2 vf_coef (V(s) - R) / B"""

    why_not = staticmethod(_ActorCriticKernel.why_not_networks)

    def gradients(self, batch: Any, vf_coef: float, ent_coef: float, normalize_advantage: bool
                  ) -> dict[str, torch.Tensor]:
        """Set every parameter's `.grad` on `batch` (a `PolicyGradientBatch`); the loss's three terms."""
        with torch.no_grad():
            f = self.forward(batch.obs, batch.actions)
            a = standardised(batch.advantages) if normalize_advantage else batch.advantages
            n = a.shape[0]
            d = f["value"] - batch.returns
            self.backward(f, -a / n, vf_coef * 2 * d / n, ent_coef)
            return {"pi": -(f["logp"] * a).mean(-1), "v": (d ** 2).mean(-1), "ent": f["entropy"].mean(-1)}


class FastDQNUpdate:
    """The gradient of `dqn_minibatch_loss` for a Q network that is a plain MLP, in closed form.

    The targets are `dqn.targets` itself (the one definition, handed in by the trainer; no gradient flows
    through them), fed by the networks' forward passes without autograd's graph. The loss is the TD error of
    the actions taken:

      loss = mean(Huber(Q(s, a) - y))   d loss / d Q(s, a) = clamp(Q(s, a) - y, -1, 1) / B
      loss = mean((Q(s, a) - y)^2)      d loss / d Q(s, a) = 2 (Q(s, a) - y) / B

    and 0 for the actions not taken; the MLP's backward pass takes it from there."""

    def __init__(self, q_net: nn.Module, q_target: nn.Module, targets: Callable[..., torch.Tensor]):
        self.q_net, self.q_target, self.targets = q_net, q_target, targets
        self.online = MLPKernel(q_net.q)  # type: ignore[arg-type]
        self.target = MLPKernel(q_target.q)  # type: ignore[arg-type]
        self.params = list(q_net.parameters())

    @staticmethod
    def why_not(q_net: nn.Module) -> str | None:
        """Why this Q network's update needs autograd, or None when this kernel computes it."""
        if any(p.requires_grad for p in q_net.encoder.parameters()):  # type: ignore[union-attr]
            return "an observation encoder with parameters"
        if not MLPKernel.supports(q_net.q):  # type: ignore[arg-type]
            return "networks other than Linear layers with tanh or ReLU"
        return None

    def _online_q(self, obs: torch.Tensor) -> torch.Tensor:
        return self.online.forward(self.q_net.encoder(obs))[0]  # type: ignore[operator]

    def _target_q(self, obs: torch.Tensor) -> torch.Tensor:
        return self.target.forward(self.q_target.encoder(obs))[0]  # type: ignore[operator]

    def gradients(self, batch: dict[str, torch.Tensor], gamma: float, hp: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Set every parameter's `.grad` to d loss / d parameter on `batch`; return the loss and the mean Q of
        the actions taken, as `dqn_minibatch_loss` does."""
        for p in self.params:
            p.grad = None
        with torch.no_grad():
            y = self.targets(hp, self._target_q, self._online_q, batch, gamma)
            q_all, kept = self.online.forward(self.q_net.encoder(batch["obs"]))  # type: ignore[operator]
            taken = batch["actions"].long().unsqueeze(-1)
            q = q_all.gather(-1, taken).squeeze(-1)
            d = q - y
            if hp.loss == "huber":
                loss = torch.nn.functional.smooth_l1_loss(q, y)
                g = d.clamp(-1.0, 1.0)
            else:
                loss = torch.nn.functional.mse_loss(q, y)
                g = 2 * d
            g = g / d.shape[0]
            self.online.backward(kept, torch.zeros_like(q_all).scatter_(-1, taken, g.unsqueeze(-1)))
            return loss, q.mean()
