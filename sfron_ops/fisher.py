"""Diagonal Fisher information over a data loader."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F


def _to(x, device):
    return x.to(device) if torch.is_tensor(x) else x


@torch.no_grad()
def fisher_diagonal(model: nn.Module, loader, loss_fn, *, scale: float | None = None, max_batches: int | None = None,
                    impl=None) -> dict[str, torch.Tensor]:
    r"""Diagonal Fisher of ``model`` over ``loader``: :math:`F = \sum_b s \, g_b^2`, float32.

    ``g_b`` is the gradient of the batch-mean loss ``loss_fn(model(x), y)`` (a
    per-sample loss is averaged). ``s`` defaults to ``1 / B`` for ``B`` batches.
    The pass runs in eval mode (batch-norm statistics are not updated) and
    leaves the model's mode and its ``.grad`` attributes as they were.

    Returns ``{parameter name: Fisher}`` for every parameter that requires grad.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    if scale is None:
        try:
            batches = len(loader)
        except TypeError:
            raise ValueError("loader has no len(); pass scale= explicitly") from None
        if max_batches is not None:
            batches = min(batches, max_batches)
        if batches == 0:
            raise ValueError("loader is empty")
        scale = 1.0 / batches
    device = named[0][1].device
    fishers = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    saved_grads = [p.grad for _, p in named]
    was_training = model.training
    model.eval()
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = _to(batch[0], device), _to(batch[1], device)
            for _, p in named:
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(model(x), y)
                if loss.dim() > 0:
                    loss = loss.mean()
                loss.backward()
            have = [(n, p) for n, p in named if p.grad is not None]
            F.fisher_accumulate_([fishers[n] for n, _ in have], [p.grad for _, p in have], scale=scale, impl=impl)
    finally:
        model.train(was_training)
        for (_, p), g in zip(named, saved_grads):
            p.grad = g
    return fishers
