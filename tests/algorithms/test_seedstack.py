"""Seeds stacked with torch.func train as their unbatched selves: the same networks, per-seed gradient
clipping, per-seed Adam with a mask, and state dicts that move between the two forms."""

from __future__ import annotations

import torch
from torch import nn

from labfleet.algorithms.seedstack import SeedAdam, SeedStack

N, BATCH, STEPS, MAX_NORM, LR = 3, 32, 25, 0.5, 3e-3


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(N, BATCH, 4, generator=g), torch.randn(N, BATCH, 2, generator=g)


def active(step: int) -> torch.Tensor:
    # seed 1 sits out every third step (as PPO's target_kl stops a seed's epochs early), seed 2 steps 5-9
    return torch.tensor([True, step % 3 != 0, not 5 <= step < 10])


def test_batched_seeds_agree_with_unbatched_ones_under_clipping_and_masked_steps():
    plain = [net(i) for i in range(N)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR, eps=1e-5) for m in plain]
    stack = SeedStack([net(i) for i in range(N)])
    opt = SeedAdam(stack.parameters(), eps=1e-5)
    clipped = 0
    for step in range(STEPS):
        x, y = data(step)
        mask = active(step)
        for i, (m, o) in enumerate(zip(plain, opts, strict=True)):
            if not mask[i]:
                continue
            o.zero_grad()
            ((m(x[i]) - y[i]) ** 2).mean().backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)
            clipped += int(norm > MAX_NORM)
            o.step()
        stack.zero_grad()
        ((stack(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()  # seeds share nothing: their own gradients
        stack.clip_grad_norms_(MAX_NORM)
        opt.step(LR, active=mask)
    assert clipped > 0, "the test must exercise clipping"
    for i, m in enumerate(plain):
        batched = stack.state_dict(i)
        for name, value in m.state_dict().items():
            torch.testing.assert_close(batched[name], value, rtol=1e-4, atol=1e-5)
        # the moments and step counts (seed 2 skipped 5 steps, seed 1 a third of them) match torch's Adam
        for k, ref in opts[i].state_dict()["state"].items():
            mine = opt.state_dict(i)[k]
            assert float(mine["step"]) == float(ref["step"])
            torch.testing.assert_close(mine["exp_avg"], ref["exp_avg"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(mine["exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-4, atol=1e-8)
    assert [int(s) for s in opt.steps] == [int(sum(active(t)[i] for t in range(STEPS))) for i in range(N)]


def test_a_stacked_seed_restores_into_an_unbatched_network_and_optimizer_and_back():
    stack = SeedStack([net(i) for i in range(N)])
    opt = SeedAdam(stack.parameters(), eps=1e-5)
    x, y = data(0)
    ((stack(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
    opt.step(LR)
    alone = net(99)
    alone.load_state_dict(stack.state_dict(1))
    torch.testing.assert_close(alone(x[1]), stack(x)[1])
    plain_opt = torch.optim.Adam(alone.parameters(), lr=LR, eps=1e-5)
    plain_opt.load_state_dict({"state": opt.state_dict(1), "param_groups": plain_opt.state_dict()["param_groups"]})
    # one more step on each side from the same state gives the same network
    stack.zero_grad()
    x, y = data(1)
    ((stack(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
    opt.step(LR)
    plain_opt.zero_grad()
    ((alone(x[1]) - y[1]) ** 2).mean().backward()
    plain_opt.step()
    for name, value in alone.state_dict().items():
        torch.testing.assert_close(stack.state_dict(1)[name], value, rtol=1e-4, atol=1e-6)
    # and back: an unbatched network in a stacked seed's place
    stack.load_state_dict(0, alone.state_dict())
    opt.load_state_dict(0, plain_opt.state_dict()["state"])
    torch.testing.assert_close(stack(x)[0], alone(x[0]))
    assert int(opt.steps[0]) == 2


def test_the_fast_path_of_an_mlp_is_the_vmapped_call_and_other_networks_fall_back():
    stack = SeedStack([net(i) for i in range(N)])
    x = torch.randn(N, 8, 4)
    torch.testing.assert_close(stack.fast(x), stack(x))
    x.requires_grad_(True)
    stack.fast(x).sum().backward()  # gradients flow through the fast path too
    fast_grads = {k: v.grad.clone() for k, v in stack.params.items()}
    stack.zero_grad()
    stack(x).sum().backward()
    for k, v in stack.params.items():
        torch.testing.assert_close(fast_grads[k], v.grad)
    normed = SeedStack([nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)) for _ in range(N)])
    assert normed._layers is None
    torch.testing.assert_close(normed.fast(x), normed(x))


def test_steps_where_every_seed_steps_alike_use_torchs_adam_and_switch_back_to_the_mask():
    """All seeds active with one rate and one step count: torch's fused Adam on the stacked tensors; then a
    masked step (the per-seed path) from the same moments; each seed stays its unbatched Adam's twin."""
    plain = [net(i) for i in range(N)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR, eps=1e-5) for m in plain]
    stack = SeedStack([net(i) for i in range(N)])
    opt = SeedAdam(stack.parameters(), eps=1e-5)
    masks = [torch.ones(N, dtype=torch.bool)] * 4 + [torch.tensor([True, False, True])] * 2
    for step, mask in enumerate(masks):
        x, y = data(step)
        for i, (m, o) in enumerate(zip(plain, opts, strict=True)):
            if mask[i]:
                o.zero_grad()
                ((m(x[i]) - y[i]) ** 2).mean().backward()
                o.step()
        stack.zero_grad()
        ((stack(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
        opt.step(LR, active=mask)
        if step == 3:
            assert opt._uniform is not None, "the uniform steps went through torch's Adam"
    for i, m in enumerate(plain):
        for name, value in m.state_dict().items():
            torch.testing.assert_close(stack.state_dict(i)[name], value, rtol=1e-5, atol=1e-6)
        assert float(opt.state_dict(i)[0]["step"]) == float(opts[i].state_dict()["state"][0]["step"])
