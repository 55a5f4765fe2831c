"""A user's own training function, run by labfleet: a small torch MLP classifying scikit-learn's 8x8 digits.

    labfleet run experiments/custom/digits_function.yaml
    labfleet sweep experiments/custom/digits_function_sweep.yaml

labfleet calls `main(config, ctx)` in a Ray actor, once per seed: `config` is the spec's `hparams`, and
`ctx` gives the seed, the device, the budget (epochs here), `report`, `checkpoint` and `restored`.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def _data() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))  # one fixed split for every seed
    x, y = torch.as_tensor(x[order] / 16.0, dtype=torch.float32), torch.as_tensor(y[order])
    return x[:1437], y[:1437], x[1437:], y[1437:]


def main(config: dict, ctx) -> None:
    torch.manual_seed(ctx.seed)
    x_train, y_train, x_test, y_test = _data()
    hidden = int(config.get("hidden", 64))
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config.get("learning_rate", 1e-3)))
    batch_size = int(config.get("batch_size", 64))
    start = 0
    if ctx.restored is not None:  # restarted after its actor died: continue, do not start over
        model.load_state_dict(ctx.restored["model"])
        optimizer.load_state_dict(ctx.restored["optimizer"])
        start = int(ctx.restored["epoch"])
    for epoch in range(start, ctx.budget):
        shuffle = torch.Generator().manual_seed(ctx.seed * 100_003 + epoch)
        order = torch.randperm(len(x_train), generator=shuffle)
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx].to(ctx.device)), y_train[idx].to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            logits = model(x_test.to(ctx.device)).cpu()
            accuracy = (logits.argmax(1) == y_test).float().mean().item()
            test_loss = nn.functional.cross_entropy(logits, y_test).item()
        ctx.report(epoch + 1, {"train/loss": float(np.mean(losses)), "eval/accuracy": accuracy,
                               "eval/loss": test_loss})
        ctx.checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1})
