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

from ..fisher import unscale_for_fisher

__all__ = ["unscale_for_fisher"]
