"""Diagonal Fisher information over a data loader."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.amp.grad_scaler import OptState

from . import functional as F
from .mask import saliency_mask

#: optimizer state keys of the two Fisher diagonals
FISHER_KEYS = {"forget": "fisher_forget", "remain": "fisher_remain"}


def _to(x, device):
    return x.to(device) if torch.is_tensor(x) else x


def batch_losses(model: nn.Module, loss_fn, inputs, targets):
    """``(losses, output)`` of one batch: ``loss_fn(model(inputs), targets)`` and the model's output, or,
    for a loss that runs the model itself (``loss_fn.takes_model``, e.g. :class:`sfron_ops.diffusion.EpsLoss`),
    ``loss_fn(model, inputs, targets)`` and ``None``."""
    if getattr(loss_fn, "takes_model", False):
        return loss_fn(model, inputs, targets), None
    output = model(inputs)
    return loss_fn(output, targets), output


@torch.no_grad()
def fisher_diagonal(model: nn.Module, loader, loss_fn, *, scale: float | None = None, max_batches: int | None = None,
                    clip_norm: float | None = None, impl=None) -> dict[str, torch.Tensor]:
    r"""Diagonal Fisher of ``model`` over ``loader``: :math:`F = \sum_b s \, (c_b g_b)^2`, float32.

    ``g_b`` is the gradient of the batch-mean loss ``loss_fn(model(x), y)`` (a
    per-sample loss is averaged), or of ``loss_fn(model, x, y)`` for a loss that
    runs the model itself (``loss_fn.takes_model``, e.g. the ε-prediction loss of
    :mod:`sfron_ops.diffusion`). ``s`` defaults to ``1 / B`` for ``B`` batches.
    With ``clip_norm``, each batch's gradient is first clipped to that total norm
    over all parameters, as ``torch.nn.utils.clip_grad_norm_`` does:
    :math:`c_b = \min(1, \text{clip\_norm} / (\lVert g_b \rVert_2 + 10^{-6}))`
    (otherwise :math:`c_b = 1`); a few batches with huge gradients then cannot
    dominate the estimate.
    The pass runs in eval mode (batch-norm statistics are not updated) and
    leaves the model's mode and its ``.grad`` attributes as they were.

    Returns ``{parameter name: Fisher}`` for every parameter that requires grad.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                  or not clip_norm > 0):
        raise ValueError(f"Invalid clip_norm: {clip_norm!r}; expected a number > 0")
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
                loss = batch_losses(model, loss_fn, x, y)[0]
                if loss.dim() > 0:
                    loss = loss.mean()
                loss.backward()
            have = [(n, p) for n, p in named if p.grad is not None]
            if clip_norm is not None and have:
                nn.utils.clip_grad_norm_([p for _, p in have], clip_norm)
            F.fisher_accumulate_([fishers[n] for n, _ in have], [p.grad for _, p in have], scale=scale, impl=impl)
    finally:
        model.train(was_training)
        for (_, p), g in zip(named, saved_grads):
            p.grad = g
    return fishers


def fisher_key(which: str) -> str:
    """The optimizer state key of the ``"forget"`` or ``"remain"`` Fisher."""
    if which not in FISHER_KEYS:
        raise ValueError(f"Invalid which: {which!r}; expected 'forget' or 'remain'")
    return FISHER_KEYS[which]


def stored(state: dict, param, which: str) -> torch.Tensor:
    """A parameter's accumulated Fisher from its optimizer ``state``; zeros where it never had a gradient."""
    f = state.get(fisher_key(which))
    return f if f is not None else torch.zeros_like(param, dtype=torch.float32)


def unscale_for_fisher(scaler, optimizer) -> bool:
    """Unscale ``optimizer``'s gradients (once per ``scaler.update()``); ``False`` if they hold an inf or a NaN.

    A Fisher is a sum of squared gradients: a scaled gradient would enter it multiplied by the
    scale squared. Reads the scaler's overflow flags, which synchronises with the device; Fisher
    passes run once per unlearning run, off the hot path.
    """
    if scaler is None or not scaler.is_enabled():
        return True
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    return not any(bool(flag.item()) for flag in state["found_inf_per_device"].values())


def accumulate_into(optimizer, which: str, scale: float = 1.0, grad_scaler=None, *, impl=None) -> bool:
    """``F_which += scale * grad^2`` (float32) into ``optimizer.state`` for every parameter with a gradient;
    call after a backward (:meth:`sfron_ops.SFRon.accumulate_fisher`).

    Squares of scaled gradients would carry the scale squared: with a ``torch.amp.GradScaler`` pass it
    as ``grad_scaler`` and the gradients are unscaled first, and a batch whose gradients overflowed is
    left out (call ``grad_scaler.update()`` after each batch). Returns whether the batch was added.
    """
    key = fisher_key(which)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or math.isnan(scale) or scale < 0:
        raise ValueError(f"Invalid scale: {scale!r}")
    if grad_scaler is not None and not unscale_for_fisher(grad_scaler, optimizer):
        return False
    fishers, grads = [], []
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        if p.grad is None:
            continue
        state = optimizer.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        fishers.append(state[key])
        grads.append(p.grad)
    with torch.no_grad():
        F.fisher_accumulate_(fishers, grads, scale=scale, impl=impl)
    return True


def diagonals(state, params, which: str) -> list:
    """The Fisher diagonals accumulated in an optimizer's ``state``, aligned with ``params`` (``None`` where none)."""
    key = fisher_key(which)
    return [state[p].get(key) if p in state else None for p in params]


def mask_from(state, params, gamma: float = 1.0, density: float | None = None, *, impl=None):
    """Saliency masks of ``params`` from the Fisher diagonals accumulated in an optimizer's ``state``
    (:meth:`sfron_ops.SFRon.compute_mask`): a :class:`sfron_ops.mask.SaliencyMask`.

    ``m = [(F_f + eps) / (F_r + eps) >= gamma]``; with ``density`` exactly the ``ceil(density * N)``
    largest ratios over all parameters are kept (ties at the cut-off broken by position). A parameter
    that never had a gradient has Fisher 0. Under FSDP2 the diagonals are DTensors and each rank
    computes its shards.
    """
    forget = [stored(state.get(p, {}), p, "forget") for p in params]
    remain = [stored(state.get(p, {}), p, "remain") for p in params]
    return saliency_mask(forget, remain, gamma=gamma, density=density, impl=impl)
