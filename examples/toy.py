"""A toy unlearning task shared by the examples: Gaussian classes, a forget set, a pretrained MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import sfron_ops


def toy_task(n: int = 512, classes: int = 4, dim: int = 16, forget_share: float = 0.1, seed: int = 0):
    """``(x, y)`` for the forget set (a random ``forget_share`` of the samples) and for the retain set."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    # flip some forget labels so the pretrained model memorises them: unlearning should then lower forget accuracy
    order = torch.randperm(n, generator=g)
    forget, retain = order[: int(forget_share * n)], order[int(forget_share * n):]
    y = y.clone()
    y[forget] = (y[forget] + 1) % classes
    return (x[forget], y[forget]), (x[retain], y[retain])


def mlp(dim: int = 16, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, classes))


def pretrained(forget, retain, steps: int = 300, seed: int = 0) -> nn.Module:
    """An MLP trained on forget and retain together (the model to unlearn from)."""
    model = mlp(forget[0].shape[1], int(retain[1].max()) + 1, seed)
    x, y = torch.cat([forget[0], retain[0]]), torch.cat([forget[1], retain[1]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def batches(data, batch: int, seed: int = 1):
    """An endless stream of random batches of ``data``."""
    g = torch.Generator().manual_seed(seed)
    x, y = data
    while True:
        idx = torch.randint(0, len(y), (batch,), generator=g)
        yield x[idx], y[idx]


def fisher_and_mask(model, opt, forget, retain, gamma: float = 10.0, n_batches: int = 4, batch: int = 32):
    """Fisher diagonals on forget and retain batches, then the ratio mask; returns ``(kept, total)``.

    The toy's forget labels are flipped, so their Fisher dwarfs the retain Fisher almost everywhere:
    γ = 10 (instead of the official 1) keeps the mask selective.
    """
    for which, data in (("forget", forget), ("remain", retain)):
        stream = batches(data, batch, seed=7)
        for _ in range(n_batches):
            x, y = next(stream)
            F.cross_entropy(model(x), y).backward()
            opt.accumulate_fisher(which, scale=1.0 / n_batches)
            opt.zero_grad()
    return opt.compute_mask(gamma=gamma)


def report(name, model, forget, retain):
    print(f"{name:>8}: forget accuracy {accuracy(model, forget):.3f}  retain accuracy {accuracy(model, retain):.3f}")


__all__ = ["toy_task", "mlp", "pretrained", "accuracy", "batches", "fisher_and_mask", "report", "sfron_ops"]
