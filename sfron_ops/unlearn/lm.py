r"""Unlearning a causal LM in the Hugging Face ``Trainer``: SFR-on and the TOFU-style baselines, one batch layout.

Every method trains on ``{"forget": {...}, "retain": {...}}`` batches
(:class:`~sfron_ops.integrations.hf.ForgetRetainDataset` with ``anchor="forget"`` and
:class:`~sfron_ops.integrations.hf.ForgetRetainCollator`). SFR-on runs through
:class:`~sfron_ops.integrations.hf.SFRonTrainer`; the baselines through :class:`UnlearnTrainer`,
whose ``compute_loss`` is the method's published loss. With :math:`\mathrm{CE}` the Trainer's
token-mean cross-entropy of a batch and :math:`\mathrm{NLL}_i` the summed next-token loss of
sequence :math:`i`'s answer tokens (:func:`sequence_nll`):

.. math::
   \text{GradAscent}: -\mathrm{CE}_f \qquad
   \text{GradDiff}: -\gamma\,\mathrm{CE}_f + \alpha\,\mathrm{CE}_r \qquad
   \text{FT}: \mathrm{CE}_r

   \text{NPO}: \gamma\,\tfrac{2}{\beta}\operatorname{mean}_i
       \operatorname{softplus}\big(\beta(\mathrm{NLL}^{ref}_i - \mathrm{NLL}_i)\big) + \alpha\,\mathrm{CE}_r
   \qquad
   \text{SimNPO}: \gamma\,\tfrac{2}{\beta}\operatorname{mean}_i
       \operatorname{softplus}\big(-\beta(\mathrm{NLL}_i / |y_i| - \delta)\big) + \alpha\,\mathrm{CE}_r

NPO's reference is a frozen copy of the model it starts from; SimNPO has none and normalises by
the answer length :math:`|y_i|` (its labelled tokens). Defaults are those of the TOFU-style
trainers: NPO β 0.1, γ = α = 1; SimNPO β 4.5, δ 0, γ 0.125, α 1; GradDiff γ = α = 1.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback

from ..integrations.hf import per_sample_loss
from .runner import _InterruptHold

LOSSES = ("ga", "graddiff", "npo", "simnpo", "ft")
DEFAULTS = {"ga": {}, "ft": {}, "graddiff": dict(gamma=1.0, alpha=1.0),
            "npo": dict(beta=0.1, gamma=1.0, alpha=1.0), "simnpo": dict(beta=4.5, delta=0.0, gamma=0.125, alpha=1.0)}


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(NLL, length)`` per sequence: the summed next-token cross-entropy over the labelled tokens (in float32)
    and how many there are."""
    nll = per_sample_loss(logits, labels, "sum")
    return nll, (labels[:, 1:] != -100).sum(dim=1)


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    r""":math:`\tfrac{2}{\beta}\operatorname{mean}\operatorname{softplus}(\beta(\mathrm{NLL}^{ref}-\mathrm{NLL}))`,
    i.e. :math:`\tfrac{2}{\beta}\log(1 + (\pi_\theta/\pi_{ref})^\beta)` on whole-answer likelihoods."""
    return 2.0 / beta * F.softplus(beta * (ref_nll - nll)).mean()


def simnpo_loss(nll: torch.Tensor, length: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    r""":math:`\tfrac{2}{\beta}\operatorname{mean}\operatorname{softplus}(-\beta(\mathrm{NLL}/|y| - \delta))`."""
    return 2.0 / beta * F.softplus(-beta * (nll / length.clamp(min=1) - delta)).mean()


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


class UnlearnTrainer(Trainer):
    """A ``Trainer`` whose loss is one of the TOFU-style unlearning losses on paired forget/retain batches.

    Args:
        loss: ``"ga"`` (GradAscent), ``"graddiff"``, ``"npo"``, ``"simnpo"`` or ``"ft"`` (the retain side only).
        beta, gamma, alpha, delta: the loss's constants (module docstring); missing ones take their defaults.
        ref_model: NPO's reference (default: a frozen copy of ``model`` as it is when the trainer is built).

    Everything else is ``Trainer``'s (optimizer, schedule, clipping, checkpoints, resume).
    """

    def __init__(self, *args, loss: str = "graddiff", ref_model=None, **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; expected one of {LOSSES}")
        constants = {k: kwargs.pop(k) for k in ("beta", "gamma", "alpha", "delta") if k in kwargs}
        unknown = sorted(set(constants) - set(DEFAULTS[loss]))
        if unknown:
            raise ValueError(f"{loss} has no constant {unknown[0]!r} (its constants: {sorted(DEFAULTS[loss])})")
        self.constants = {**DEFAULTS[loss], **constants}
        for k, v in self.constants.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or (k == "beta" and v <= 0):
                raise ValueError(f"Invalid {k}: {v!r}; expected a finite number" + (" > 0" if k == "beta" else ""))
        self.unlearn_loss = loss
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # batches are {"forget": ..., "retain": ...}
        self.ref_model = None
        if loss == "npo":
            self.ref_model = copy.deepcopy(self.model if ref_model is None else ref_model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (isinstance(inputs, dict) and "forget" in inputs and "retain" in inputs):
            raise ValueError("UnlearnTrainer batches are {'forget': ..., 'retain': ...} "
                             "(ForgetRetainDataset + ForgetRetainCollator build them)")
        c, kind = self.constants, self.unlearn_loss
        forget, retain = inputs["forget"], inputs["retain"]
        if kind == "ft":
            return model(**retain).loss
        if kind in ("ga", "graddiff"):
            loss = -model(**forget).loss
            if kind == "ga":
                return loss
            return c["gamma"] * loss + c["alpha"] * model(**retain).loss
        nll, length = sequence_nll(_logits(model, forget), forget["labels"])
        if kind == "npo":
            with torch.no_grad():
                ref_nll, _ = sequence_nll(_logits(self.ref_model, forget), forget["labels"])
            forget_loss = npo_loss(nll, ref_nll, c["beta"])
        else:
            forget_loss = simnpo_loss(nll, length, c["beta"], c["delta"])
        return c["gamma"] * forget_loss + c["alpha"] * model(**retain).loss


class SequenceLoss:
    """Per-sequence next-token loss of a causal LM on ``(input_ids, labels)`` batches, for
    :func:`sfron_ops.fisher_diagonal` (it runs the model itself: ``takes_model``); ``reduction`` as in
    :func:`~sfron_ops.integrations.hf.per_sample_loss`. Padding (``pad_id``) is masked out of attention."""

    takes_model = True
    reduction = "none"

    def __init__(self, pad_id: int, reduction: str = "sum"):
        self.pad_id, self.sequence = pad_id, reduction

    def __call__(self, model, input_ids, labels):
        logits = model(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits
        return per_sample_loss(logits, labels, self.sequence)


class RunClock(TrainerCallback):
    """Wall time of a ``Trainer`` run across resumes, and Ctrl-C at a step boundary.

    ``seconds`` starts at ``start`` (what earlier segments took) and adds this segment's training time;
    every checkpoint the Trainer saves gets a ``clock.json`` with the total so far, which
    :meth:`resumed` reads back. While the run trains, a Ctrl-C is held until the current step ends; the
    Trainer then saves a checkpoint and stops, and ``interrupted`` is True (a second Ctrl-C stops at once).
    """

    def __init__(self, start: float = 0.0):
        self.seconds, self.interrupted = start, False
        self._t0, self._hold = None, None

    @staticmethod
    def resumed(checkpoint: str | None) -> float:
        path = None if checkpoint is None else os.path.join(checkpoint, "clock.json")
        if path is None or not os.path.exists(path):
            return 0.0
        with open(path) as fh:
            return float(json.load(fh)["seconds"])

    def _lap(self):
        if self._t0 is not None:
            now = time.perf_counter()
            self.seconds += now - self._t0
            self._t0 = now

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._hold = _InterruptHold()

    def on_step_end(self, args, state, control, **kwargs):
        self._lap()
        if self._hold is not None and self._hold.requested:
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):  # after the checkpoint is written
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, "clock.json"), "w") as fh:
                json.dump({"seconds": self.seconds, "global_step": state.global_step}, fh)
        self._t0 = time.perf_counter()  # writing the checkpoint is not part of the run

    def on_train_end(self, args, state, control, **kwargs):
        self._lap()
        self._t0 = None
        if self._hold is not None:
            self._hold.release()
            self._hold = None


def last_checkpoint(folder: str) -> str | None:
    """The Trainer checkpoint (``checkpoint-N``) with the largest N under ``folder``, or None."""
    if not os.path.isdir(folder):
        return None
    steps = [int(d.split("-")[1]) for d in os.listdir(folder)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
             and os.path.exists(os.path.join(folder, d, "trainer_state.json"))]
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None
