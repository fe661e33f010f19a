"""Mixed precision: ``torch.amp.GradScaler`` with both SFR-on phases and with Fisher passes.

Steps need nothing special: ``GradScaler.step`` forwards keyword arguments, so
``scaler.step(opt, phase="forget")`` unscales, skips the step on an overflow, and
calls ``opt.step(phase="forget")``. A scaler allows one ``step`` per ``update``,
so call ``scaler.update()`` after each phase.

The Fisher is a sum of squared gradients, so a scaled gradient would enter it
multiplied by the scale squared; :func:`unscale_for_fisher` unscales first and
reports an overflow, in which case the batch is left out.
"""

from __future__ import annotations

from torch.amp.grad_scaler import OptState


def unscale_for_fisher(scaler, optimizer) -> bool:
    """Unscale ``optimizer``'s gradients (once per ``scaler.update()``); ``False`` if they hold an inf or a NaN.

    Reads the scaler's overflow flags, which synchronises with the device; Fisher
    passes run once per unlearning run, off the hot path.
    """
    if scaler is None or not scaler.is_enabled():
        return True
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    return not any(bool(flag.item()) for flag in state["found_inf_per_device"].values())
