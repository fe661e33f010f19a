"""Forgetting you can see: the forget loss and accuracy of every forget step, and a warning when the loss stays put.

Unlearning by gradient ascent fails quietly: with a step size too small for the model, or with the
adaptive weights stuck on samples of zero loss, the forget set stays fitted and every metric of the
remain set looks fine. :class:`ForgetMonitor` records what each forget batch looked like *before*
its step and checks, after ``patience`` forget steps and every ``patience`` steps after that,
whether the forget loss has risen to ``rise`` times its first value. If it has not, it warns once
(:class:`ForgettingStalledWarning`) and names the two knobs the SFR-on authors recommend for
forgetting more: a larger ``forget_alpha`` and more frequent forget steps.

The records stay tensors until a check, so the monitor adds one host synchronisation per
``patience`` forget steps.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn import functional as F

__all__ = ["ForgetMonitor", "ForgettingStalledWarning", "SFRON_ADVICE"]

#: what the SFR-on authors suggest when the forget set is not forgotten
SFRON_ADVICE = ("raise forget_alpha (e.g. 4x) or take forget steps more often (a smaller forget_freq; "
                "the official class-wise setting takes one every iteration)")


class ForgettingStalledWarning(UserWarning):
    """The forget loss has not risen after the monitor's ``patience`` forget steps."""


def _number(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


class ForgetMonitor:
    """Records the forget loss and accuracy per forget step and warns if the loss has not risen.

    Args:
        patience: forget steps before the first check, and between checks (default 10).
        rise: the forget loss has "risen" once the mean of the latest ``ceil(patience / 4)`` records
            reaches ``rise`` times the first record (default 2: doubled). ``None``: record only, never
            judge (for a loss this rule does not fit, such as a diffusion model's ε-loss).
        warn: issue a :class:`ForgettingStalledWarning` at the first check that finds no rise
            (default True); :attr:`stalled` says so either way.
        advice: the sentence the warning ends with (default: the SFR-on knobs, :data:`SFRON_ADVICE`).

    Use it in a plain loop with the forget batch's output from before the step::

        monitor = ForgetMonitor()
        out = model(xf)
        forget_loss(out, yf).backward()
        opt.step(phase="forget")
        monitor.update(out, yf)          # per-sample cross-entropy and accuracy of this batch

    or pass numbers (or 0-dim tensors) with :meth:`record`. :meth:`summary` gives the first and
    latest loss and accuracy for a progress bar or a log line.
    """

    def __init__(self, patience: int = 10, rise: float | None = 2.0, *, warn: bool = True,
                 advice: str | None = SFRON_ADVICE):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Invalid patience: {patience!r}; expected an integer >= 1")
        if rise is not None and (isinstance(rise, bool) or not isinstance(rise, (int, float))
                                 or not 1.0 <= rise < math.inf):
            raise ValueError(f"Invalid rise: {rise!r}; expected a finite number >= 1 or None")
        self.patience, self.rise, self.warn, self.advice = patience, None if rise is None else float(rise), warn, advice
        self.losses: list = []
        self.accuracies: list = []
        self.stalled = False
        self.warned = False

    def __len__(self) -> int:
        return len(self.losses)

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.patience / 4))

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor, loss=None) -> None:
        """Record one forget batch from the model's ``output`` on it: ``loss`` (default: the mean
        per-sample cross-entropy) and, for class logits ``[N, C]`` with integer targets, the accuracy in %."""
        output = output.detach()
        if loss is None:
            loss = F.cross_entropy(output.float(), target)
        accuracy = None
        if output.dim() == 2 and target.dim() == 1 and not target.is_floating_point():
            accuracy = (output.argmax(dim=1) == target).float().mean() * 100.0
        self.record(loss, accuracy)

    def record(self, loss, accuracy=None) -> None:
        """Record one forget step's loss (and accuracy in %): numbers or 0-dim tensors, kept until a check."""
        self.losses.append(loss.detach() if torch.is_tensor(loss) else float(loss))
        self.accuracies.append(None if accuracy is None else accuracy.detach() if torch.is_tensor(accuracy)
                               else float(accuracy))
        if len(self.losses) % self.patience == 0:
            self.check()

    def check(self) -> bool:
        """Whether the forget loss has risen (see ``rise``); updates :attr:`stalled` and warns on the first stall."""
        if self.rise is None or len(self.losses) < self.patience:
            return not self.stalled
        first = _number(self.losses[0])
        latest = sum(_number(v) for v in self.losses[-self.window:]) / self.window
        # a NaN or infinite loss is no stall (the non-finite guard and the metrics report it); a first loss of 0
        # that stays 0 is one
        self.stalled = math.isfinite(latest) and not latest > self.rise * first
        if self.stalled and self.warn and not self.warned:
            self.warned = True
            acc = self.accuracies[-1]
            acc_text = "" if acc is None else f", forget accuracy {_number(acc):.1f} %"
            warnings.warn(
                f"the forget loss has not risen in {len(self.losses)} forget steps: {first:.4g} at the first, "
                f"{latest:.4g} now (mean of the last {self.window}{acc_text}), below {self.rise:g}x the first. The "
                f"model is not forgetting; {self.advice or 'take larger forget steps'}.",
                ForgettingStalledWarning, stacklevel=3)
        return not self.stalled

    def summary(self) -> dict:
        """``{"forget_steps", "first_loss", "loss", "first_acc", "acc", "stalled"}`` as plain numbers (a host sync)."""
        if not self.losses:
            return {"forget_steps": 0}
        out = {"forget_steps": len(self.losses), "first_loss": _number(self.losses[0]),
               "loss": _number(self.losses[-1]), "stalled": self.stalled}
        if self.accuracies[-1] is not None:
            out.update(first_acc=_number(self.accuracies[0]), acc=_number(self.accuracies[-1]))
        return out

    def postfix(self) -> dict:
        """A short progress-bar view: ``{"forget": "0.0591→12.3", "forget_acc": "40", "note": "not rising"}``."""
        s = self.summary()
        if not s["forget_steps"]:
            return {}
        out = {"forget": f"{s['first_loss']:.3g}→{s['loss']:.3g}"}
        if "acc" in s:
            out["forget_acc"] = f"{s['acc']:.3g}"
        if s["stalled"]:
            out["note"] = "not rising"
        return out

    def state_dict(self) -> dict:
        return {"losses": [_number(v) for v in self.losses],
                "accuracies": [None if a is None else _number(a) for a in self.accuracies],
                "stalled": self.stalled, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.accuracies = list(state["losses"]), list(state["accuracies"])
        self.stalled, self.warned = state["stalled"], state["warned"]
