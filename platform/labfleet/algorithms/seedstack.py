"""Seeds trained together in one process: N copies of one network, one per
seed, held as stacked parameters and called as one batched network with `torch.func`.

A 64x64 MLP's forward pass costs about the same for 8 rows as for 512: on these tasks a core mostly waits
on per-call overhead. Stacking the seeds' networks turns N small calls into one:

    stack = SeedStack([make_net() for _ in seeds])     # stack_module_state: parameters (N, ...)
    out = stack(x)                                    # x (N, B, ...) -> vmap(functional_call) -> (N, B, ...)
    loss = per_seed_losses.sum()                      # seeds share no parameter: each gets its own gradient
    loss.backward()
    norms = stack.clip_grad_norms_(max_grad_norm)     # per seed, as clip_grad_norm_ on each network alone
    opt.step(lr, active=mask)                         # per-seed Adam; masked seeds (e.g. PPO's target_kl
                                                      # early stop) take no step and keep their moments

What stays per seed: parameters, gradient-norm clipping, Adam's moments and step count (so a seed that
skipped steps keeps its own bias correction), and each seed's state dict, which `state_dict(i)` gives in
the unbatched network's own format (a batched seed's checkpoint restores into an unbatched trainer).

Numerics: a batched matmul can round differently from N separate ones, so batched and unbatched seeds agree
to float32 rounding (about 1e-6 relative per step), not bit for bit; `tests/algorithms/test_seedstack.py`
measures it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from labfleet.algorithms.optim import FusedAdam


class SeedStack:
    """N networks of one architecture as one: parameters stacked along a leading seed axis."""

    def __init__(self, modules: Sequence[nn.Module]):
        if not modules:
            raise ValueError("a SeedStack needs at least one network")
        params, buffers = stack_module_state(list(modules))
        self.n = len(modules)
        self.params: dict[str, torch.Tensor] = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in buffers.items()}
        base = copy.deepcopy(modules[0]).to("meta")  # the architecture only; its tensors live in the stack

        def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
            return functional_call(base, (p, b), (x,))

        self._call = vmap(call)
        self._layers = _mlp_layers(base)

    def __call__(self, x: torch.Tensor) -> Any:
        """x: (N, ...) with seed i's inputs at x[i]; the output has the seed axis first too."""
        return self._call(self.params, self.buffers, x)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same as calling the stack on x (N, B, features), for an `nn.Sequential` MLP (Linear layers
        and parameter-free activations), as one `baddbmm` per layer: `vmap` costs about 0.15 ms a call,
        more than a small MLP's own forward pass, which a rollout pays at every step. Other networks: vmap."""
        if self._layers is None or x.dim() != 3:
            return self(x)
        return self._run(self._layers, "", x)

    def mlp(self, prefix: str, module: nn.Module, x: torch.Tensor,
            params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The stacked copy of the sub-network `module` (an `nn.Sequential` MLP whose parameters are named
        `prefix` + its own names in the stacked network) on x (N, B, features), by `baddbmm`; with `params`
        in place of the stack's own (stacked the same way: a target network's, an earlier policy's)."""
        layers = _mlp_layers(module)
        if layers is None:
            raise TypeError(f"{prefix or 'the network'} is not an nn.Sequential of Linear layers and activations")
        return self._run(layers, prefix, x, params)

    def _run(self, layers: list[tuple[str | None, nn.Module]], prefix: str, x: torch.Tensor,
             params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = self.params if params is None else params
        for index, layer in layers:
            if index is None:
                x = layer(x)
            else:
                w, b = params[f"{prefix}{index}.weight"], params.get(f"{prefix}{index}.bias")
                wt = w.transpose(1, 2)
                x = torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)
        return x

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def grad_norms(self) -> torch.Tensor:
        """Each seed's global gradient norm over all its parameters, shape (N,)."""
        squares = [p.grad.reshape(self.n, -1).pow(2).sum(1) for p in self.params.values() if p.grad is not None]
        return torch.stack(squares).sum(0).sqrt()

    def clip_grad_norms_(self, max_norm: float | torch.Tensor | None) -> torch.Tensor:
        """Scale each seed's gradients as `torch.nn.utils.clip_grad_norm_` would on that seed's network
        alone (`max_norm` a tensor (N,): each seed's own, inf for none); returns the norms before clipping."""
        norms = self.grad_norms()
        if max_norm is not None:
            scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
        return norms

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Seed i's network as the unbatched module's `state_dict()`."""
        return {k: v[i].detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Put an unbatched network's state dict in seed i's place."""
        with torch.no_grad():
            for k, v in {**self.params, **self.buffers}.items():
                v[i].copy_(state[k])


def _mlp_layers(module: nn.Module) -> list[tuple[str | None, nn.Module]] | None:
    """(parameter prefix, layer) of an `nn.Sequential` of Linear layers and parameter-free elementwise
    activations, with None for the activations; None for any other network."""
    if not isinstance(module, nn.Sequential):
        return None
    layers: list[tuple[str | None, nn.Module]] = []
    for name, layer in module.named_children():
        if isinstance(layer, nn.Linear):
            layers.append((name, layer))
        elif isinstance(layer, (nn.Tanh, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Identity)):
            layers.append((None, layer))
        else:
            return None
    return layers


class SeedAdam:
    """Adam (Kingma and Ba 2015, torch.optim.Adam's update without weight decay or amsgrad) over stacked
    parameters, with a step count per seed, so that `active` can leave seeds out of a step entirely."""

    def __init__(self, params: Sequence[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        self.n = self.params[0].shape[0]
        self.betas, self.eps = betas, eps
        self.steps = torch.zeros(self.n, dtype=torch.int64)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self._uniform: FusedAdam | torch.optim.Adam | None = None

    @torch.no_grad()
    def step(self, lr: float | torch.Tensor, active: torch.Tensor | None = None) -> None:
        """One step for the seeds where `active` (bool, (N,)) is true; lr: one rate or one per seed."""
        mask = torch.ones(self.n, dtype=torch.bool) if active is None else active.cpu().to(torch.bool)
        rates = torch.as_tensor(lr, dtype=torch.float64).cpu().expand(self.n)
        if bool(mask.all()) and bool((self.steps == self.steps[0]).all()) and bool((rates == rates[0]).all()):
            self._step_uniform(float(rates[0]))
            return
        self.steps += mask.long()
        b1, b2 = self.betas
        device, dtype = self.params[0].device, self.params[0].dtype
        t = self.steps.clamp(min=1).to(torch.float64)
        correction1 = (1 - b1 ** t).to(device=device, dtype=dtype)
        correction2_sqrt = torch.sqrt(1 - b2 ** t).to(device=device, dtype=dtype)
        rate = torch.as_tensor(lr, dtype=dtype).to(device).expand(self.n)
        mask = mask.to(device)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            keep = mask.view(shape)
            g = p.grad
            m.copy_(torch.where(keep, m * b1 + g * (1 - b1), m))
            v.copy_(torch.where(keep, v * b2 + g * g * (1 - b2), v))
            step_size = (rate / correction1).view(shape)
            denom = v.sqrt() / correction2_sqrt.view(shape) + self.eps
            p.sub_(torch.where(keep, step_size * m / denom, torch.zeros_like(p)))

    def _step_uniform(self, lr: float) -> None:
        """Every seed steps, with one rate and one step count: torch's own (fused) Adam over the stacked
        tensors does exactly the per-seed update, elementwise, in one kernel per parameter list (the
        masked update above costs about 1 ms a step in small tensor operations)."""
        if self._uniform is None:
            self._uniform = (FusedAdam(self.params, lr=lr, betas=self.betas, eps=self.eps)
                             if FusedAdam.supports(self.params)
                             else torch.optim.Adam(self.params, lr=lr, betas=self.betas, eps=self.eps))
        opt = self._uniform
        opt.param_groups[0]["lr"] = lr
        step = torch.tensor(float(self.steps[0]), device=self.params[0].device if opt.defaults.get("fused") else None)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            opt.state[p] = {"step": step.clone(), "exp_avg": m, "exp_avg_sq": v}  # the moments, shared
        opt.step()
        self.steps += 1

    def state_dict(self, i: int) -> dict[int, dict[str, torch.Tensor]]:
        """Seed i's moments and step count as `torch.optim.Adam.state_dict()["state"]` of its unbatched
        network (parameters in the network's order), so that its checkpoint restores into a plain Adam."""
        step = torch.tensor(float(self.steps[i]))
        return {k: {"step": step.clone(), "exp_avg": m[i].clone(), "exp_avg_sq": v[i].clone()}
                for k, (m, v) in enumerate(zip(self.m, self.v, strict=True))}

    def load_state_dict(self, i: int, state: dict[int, dict[str, torch.Tensor]]) -> None:
        """Seed i's place from an unbatched `torch.optim.Adam.state_dict()["state"]`."""
        self.steps[i] = int(state[0]["step"])  # one count for all of a network's parameters
        with torch.no_grad():
            for k, (m, v) in enumerate(zip(self.m, self.v, strict=True)):
                m[i].copy_(state[k]["exp_avg"])
                v[i].copy_(state[k]["exp_avg_sq"])


class SeedRMSprop:
    """RMSprop (torch.optim.RMSprop's update without momentum, centring or weight decay) over stacked
    parameters, with a step count per seed and the `active` mask of `SeedAdam`."""

    def __init__(self, params: Sequence[torch.Tensor], alpha: float = 0.99, eps: float = 1e-8):
        self.params = list(params)
        self.n = self.params[0].shape[0]
        self.alpha, self.eps = alpha, eps
        self.steps = torch.zeros(self.n, dtype=torch.int64)
        self.square_avg = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float | torch.Tensor, active: torch.Tensor | None = None) -> None:
        mask = torch.ones(self.n, dtype=torch.bool) if active is None else active.cpu().to(torch.bool)
        self.steps += mask.long()
        device, dtype = self.params[0].device, self.params[0].dtype
        rate = torch.as_tensor(lr, dtype=dtype).to(device).expand(self.n)
        mask = mask.to(device)
        for p, sq in zip(self.params, self.square_avg, strict=True):
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            keep = mask.view(shape)
            g = p.grad
            sq.copy_(torch.where(keep, sq * self.alpha + g * g * (1 - self.alpha), sq))
            update = rate.view(shape) * g / (sq.sqrt() + self.eps)
            p.sub_(torch.where(keep, update, torch.zeros_like(p)))

    def state_dict(self, i: int) -> dict[int, dict[str, torch.Tensor]]:
        """Seed i's state as `torch.optim.RMSprop.state_dict()["state"]` of its unbatched network."""
        step = torch.tensor(float(self.steps[i]))
        return {k: {"step": step.clone(), "square_avg": sq[i].clone()} for k, sq in enumerate(self.square_avg)}

    def load_state_dict(self, i: int, state: dict[int, dict[str, torch.Tensor]]) -> None:
        self.steps[i] = int(state[0]["step"])
        with torch.no_grad():
            for k, sq in enumerate(self.square_avg):
                sq[i].copy_(state[k]["square_avg"])
