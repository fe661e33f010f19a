"""Hugging Face Accelerate: SFR-on through ``accelerator.prepare(model, optimizer)``.

``AcceleratedOptimizer.step(closure=None)`` takes no ``phase``; the phase is set on
the SFRon inside it (:func:`sfron_ops.phase`), and Accelerate's own step (gradient
synchronisation, the fp16 GradScaler with its ``update``, skipped steps during
gradient accumulation) runs unchanged::

    model, opt = accelerator.prepare(model, SFRon(model.named_parameters(), ...))
    with sfron_ops.phase(opt, "forget"):
        accelerator.backward(forget_loss)
        opt.step()
    opt.zero_grad()

``prepare`` round-trips the optimizer's state dict, which keeps masks set before it.
Gradient accumulation skips optimizer steps, so count ``forget_freq`` in optimizer
steps (``accelerator.sync_gradients``), not in batches.
"""

from __future__ import annotations

from . import phase as _phase
from . import unwrap_optimizer

__all__ = ["step", "accumulate_fisher"]


def step(accelerator, optimizer, loss, phase: str = "remain") -> None:
    """``accelerator.backward(loss)``, then one ``phase`` step of the (wrapped) SFRon, then ``zero_grad``."""
    accelerator.backward(loss)
    with _phase(optimizer, phase):
        optimizer.step()
    optimizer.zero_grad()


def accumulate_fisher(accelerator, optimizer, loss, which: str, scale: float = 1.0) -> bool:
    """Backward ``loss`` and add the squared, unscaled gradients to the ``which`` Fisher; returns whether added.

    With fp16 mixed precision Accelerate scales the loss: the gradients are
    unscaled first, and a batch that overflowed is left out (the scaler's
    ``update`` then backs the scale off). Gradients are cleared afterwards.
    """
    accelerator.backward(loss)
    scaler = getattr(accelerator, "scaler", None)
    added = unwrap_optimizer(optimizer).accumulate_fisher(which, scale=scale, grad_scaler=scaler)
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad()
    return added
