"""What stacking seeds buys: one optimiser update (forward, backward, per-seed gradient
clipping, Adam) of N seeds' 64x64 MLPs (PPO's CartPole actor size) on minibatches of 256, as N separate
networks with torch.optim.Adam against one `SeedStack` with `SeedAdam`. One torch thread, as a trial actor
with one CPU has.

    python benchmarks/seed_stack.py [--seeds 1,5,10,64] [--batch 256] [--updates 200]

Also one policy call on 8 observations per seed (a rollout step of 8 environments), without gradients:
vmapped, and the stack's baddbmm fast path for MLPs.
Prints one JSON line per N: milliseconds for all N seeds, each way, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from labfleet.algorithms.seedstack import SeedAdam, SeedStack


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))


def separate(n: int, x: torch.Tensor, y: torch.Tensor, updates: int) -> float:
    nets = [net() for _ in range(n)]
    opts = [torch.optim.Adam(m.parameters(), lr=3e-4, eps=1e-5) for m in nets]
    start = time.perf_counter()
    for _ in range(updates):
        for i, (m, o) in enumerate(zip(nets, opts, strict=True)):
            o.zero_grad()
            ((m(x[i]) - y[i]) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
    return (time.perf_counter() - start) / updates * 1000


def stacked(n: int, x: torch.Tensor, y: torch.Tensor, updates: int, fast: bool = False) -> float:
    stack = SeedStack([net() for _ in range(n)])
    opt = SeedAdam(stack.parameters(), eps=1e-5)
    start = time.perf_counter()
    for _ in range(updates):
        stack.zero_grad()
        ((stack.fast(x) if fast else stack(x)) - y).pow(2).mean(dim=(1, 2)).sum().backward()
        stack.clip_grad_norms_(0.5)
        opt.step(3e-4)
    return (time.perf_counter() - start) / updates * 1000


@torch.no_grad()
def acting(n: int, envs: int, calls: int) -> tuple[float, float, float]:
    """Milliseconds per policy call of all N seeds on `envs` observations each (a rollout step): N calls of
    separate networks, one vmapped call of the stack, and the stack's baddbmm fast path."""
    nets, stack = [net() for _ in range(n)], SeedStack([net() for _ in range(n)])
    obs = torch.randn(n, envs, 4)
    start = time.perf_counter()
    for _ in range(calls):
        for i, m in enumerate(nets):
            m(obs[i])
    mid = time.perf_counter()
    for _ in range(calls):
        stack(obs)
    end = time.perf_counter()
    for _ in range(calls):
        stack.fast(obs)
    last = time.perf_counter()
    return (mid - start) / calls * 1000, (end - mid) / calls * 1000, (last - end) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,5,10,64")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--updates", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in (int(s) for s in args.seeds.split(",")):
        x, y = torch.randn(n, args.batch, 4), torch.randn(n, args.batch, 2)
        separate(n, x, y, 5), stacked(n, x, y, 5)  # warm up
        a, b = separate(n, x, y, args.updates), stacked(n, x, y, args.updates)
        f = stacked(n, x, y, args.updates, fast=True)
        c, d, e = acting(n, 8, args.updates * 5)
        print(json.dumps({"seeds": n, "update_separate_ms": round(a, 3), "update_stacked_ms": round(b, 3),
                          "update_fast_ms": round(f, 3), "update_speedup": round(a / b, 2),
                          "update_speedup_fast": round(a / f, 2), "act_separate_ms": round(c, 3),
                          "act_vmap_ms": round(d, 3), "act_fast_ms": round(e, 3),
                          "act_speedup_vmap": round(c / d, 2), "act_speedup_fast": round(c / e, 2)}), flush=True)


if __name__ == "__main__":
    main()
