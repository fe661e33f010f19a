"""Framework integrations: phase helpers for wrapped optimizers, AMP, and trainers.

Wrappers such as Accelerate's ``AcceleratedOptimizer`` forward ``step()`` without
keyword arguments, so ``step(phase="forget")`` cannot reach SFRon through them;
:func:`phase` and :func:`set_phase` find the SFRon inside (``.optimizer`` or
``._optimizer``, as deep as the wrapping goes) and set its current phase, which
the next plain ``step()`` uses. Lightning's ``LightningOptimizer`` forwards
keyword arguments, so ``opt.step(phase="forget")`` works there directly.

The trainer modules (:mod:`~sfron_ops.integrations.hf`,
:mod:`~sfron_ops.integrations.accelerate`, :mod:`~sfron_ops.integrations.lightning`)
import their framework only when imported themselves.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..optim import SFRon

__all__ = ["unwrap_optimizer", "phase", "set_phase"]

_WRAPPED_ATTRS = ("optimizer", "_optimizer")


def unwrap_optimizer(optimizer) -> SFRon:
    """The :class:`~sfron_ops.SFRon` inside ``optimizer`` (itself if it is one)."""
    seen = set()
    current = optimizer
    while not isinstance(current, SFRon):
        if id(current) in seen:
            break
        seen.add(id(current))
        inner = next((getattr(current, a) for a in _WRAPPED_ATTRS if getattr(current, a, None) is not None), None)
        if inner is None:
            break
        current = inner
    if not isinstance(current, SFRon):
        raise TypeError(f"no SFRon optimizer inside {type(optimizer).__name__} (looked through "
                        f"{' / '.join('.' + a for a in _WRAPPED_ATTRS)})")
    return current


def set_phase(optimizer, phase: str) -> str:
    """Make ``phase`` the phase of the next plain ``step()`` of ``optimizer`` (or the SFRon it wraps).

    Returns the previous phase. Prefer :func:`phase`, which restores it.
    """
    opt = unwrap_optimizer(optimizer)
    previous = opt.current_phase
    opt.current_phase = phase
    return previous


@contextmanager
def phase(optimizer, phase: str):
    """``with phase(acc_opt, "forget"): acc_opt.step()``: steps of a wrapped SFRon inside are ``phase`` steps."""
    with unwrap_optimizer(optimizer).phase(phase) as opt:
        yield opt
