r"""Hugging Face ``Trainer`` integration: :class:`SFRonTrainer` runs SFR-on inside ``trainer.train()``.

Each training batch holds a forget batch and a retain batch, ``{"forget": {...}, "retain": {...}}``
(:class:`ForgetRetainDataset` with :class:`ForgetRetainCollator` builds them). Every
``forget_freq`` optimizer steps, :meth:`SFRonTrainer.training_step` first takes a forget step of
its own: the sample-wise adaptive forget loss, backward, ``step`` in the forget phase, with
:math:`\alpha_i = \alpha\,(1 + \cos(\pi i / n))/2` as in the official loop (``alpha_schedule=
"constant"`` keeps it fixed). It then hands the retain batch to the stock ``training_step``, so
the Trainer's own backward, gradient clipping (``max_grad_norm``), optimizer step (the remain
phase), LR scheduler, logging and checkpointing run as usual. SFRon is built from
``model.named_parameters()`` with the Trainer's weight-decay split, so masks can be keyed by
parameter name.

A forget step is a whole optimizer step, so it cannot share gradients with an accumulation
window: ``gradient_accumulation_steps`` must be 1.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from transformers import Trainer

from ..loss import LOSS_FLOOR, adaptive_weights, check_weight_args
from ..optim import SFRon
from . import phase, unwrap_optimizer

__all__ = ["SFRonTrainer", "ForgetRetainDataset", "ForgetRetainCollator", "per_sample_loss"]


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Pairs forget and retain examples into ``{"forget": ..., "retain": ...}`` items.

    ``anchor="retain"`` (default): one item per retain example, the (usually smaller) forget set cycled.
    ``anchor="forget"``: one item per forget example, each with a retain example drawn at random, as the
    TOFU-style unlearning trainers pair them; ``epochs=E`` lists the forget set ``E`` times, each time in a
    new order and with new retain partners, so that one pass over the dataset (one Trainer epoch) is ``E``
    epochs over the forget set. The order and the partners are fixed by ``seed`` when the dataset is built,
    so a Trainer resumed from a checkpoint sees the same pairs as one that never stopped.
    """

    def __init__(self, forget, retain, *, anchor: str = "retain", epochs: int = 1, seed: int = 0):
        if len(forget) == 0 or len(retain) == 0:
            raise ValueError(f"forget and retain sets must be non-empty, got {len(forget)} and {len(retain)}")
        if anchor not in ("retain", "forget"):
            raise ValueError(f"Invalid anchor: {anchor!r}; expected 'retain' or 'forget'")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Invalid epochs: {epochs!r}; expected an integer >= 1")
        if anchor == "retain" and epochs != 1:
            raise ValueError("epochs applies to anchor='forget'; with anchor='retain' every item is a retain example")
        self.forget, self.retain, self.anchor = forget, retain, anchor
        if anchor == "forget":
            g = torch.Generator().manual_seed(seed)
            self.forget_index = torch.cat([torch.randperm(len(forget), generator=g) for _ in range(epochs)]).tolist()
            self.retain_index = torch.randint(len(retain), (len(self.forget_index),), generator=g).tolist()

    def __len__(self):
        return len(self.retain) if self.anchor == "retain" else len(self.forget_index)

    def __getitem__(self, i):
        if self.anchor == "retain":
            return {"forget": self.forget[i % len(self.forget)], "retain": self.retain[i]}
        return {"forget": self.forget[self.forget_index[i]], "retain": self.retain[self.retain_index[i]]}


class ForgetRetainCollator:
    """Collates the forget and the retain examples of a batch separately with ``collate``."""

    def __init__(self, collate=None):
        self.collate = collate or torch.utils.data.default_collate

    def __call__(self, examples):
        return {side: self.collate([e[side] for e in examples]) for side in ("forget", "retain")}


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """One cross-entropy per sample: classification logits ``[N, C]``, or causal-LM logits ``[N, T, V]``
    (next-token loss over each sequence's labelled tokens, ``-100`` ignored), averaged over those tokens
    (``reduction="mean"``) or summed: the sequence's negative log-likelihood (``"sum"``)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid reduction: {reduction!r}; expected 'mean' or 'sum'")
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() != 3:
        raise ValueError(f"per_sample_loss takes [N, C] or [N, T, V] logits, got shape {tuple(logits.shape)}")
    logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    if reduction == "sum":
        return tokens.sum(dim=1)
    counted = (labels != -100).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counted


class SFRonTrainer(Trainer):
    r"""A ``Trainer`` that unlearns with SFR-on: forget steps in ``training_step``, remain steps by the Trainer.

    Args:
        sfron_kwargs: keyword arguments for :class:`~sfron_ops.SFRon` (``base``, ``momentum``,
            ``forget_alpha``, ``max_grad_norm``, ``slow_alpha``, ...); ``lr`` defaults to
            ``args.learning_rate`` and weight decay follows ``args.weight_decay``.
        masks: saliency masks for :meth:`~sfron_ops.SFRon.set_masks` (dict by parameter name).
        forget_freq: a forget step every ``forget_freq`` optimizer steps (the official code uses 5).
        alpha_schedule: ``"cosine"`` (official) or ``"constant"``.
        lambd: λ of the adaptive weights :math:`w_i \propto 1 / \max(\ell_i, f)^{\lambda}`.
        loss_floor: their floor :math:`f` (default ``sfron_ops.LOSS_FLOOR``; ``None``: the official formula).
        sequence_loss: a causal LM's per-sample forget loss: ``"mean"`` (the average next-token loss over the
            labelled tokens) or ``"sum"`` (their sum: the sequence's negative log-likelihood, e.g. of an answer).

    Everything else is ``Trainer``'s. With ``optimizers=(opt, sched)`` an SFRon built by the caller is used.
    """

    def __init__(self, *args, sfron_kwargs=None, masks=None, forget_freq: int = 1, alpha_schedule: str = "cosine",
                 lambd: float = 0.5, loss_floor: float | None = LOSS_FLOOR, sequence_loss: str = "mean", **kwargs):
        if isinstance(forget_freq, bool) or not isinstance(forget_freq, int) or forget_freq < 1:
            raise ValueError(f"Invalid forget_freq: {forget_freq!r}")
        if alpha_schedule not in ("cosine", "constant"):
            raise ValueError(f"Invalid alpha_schedule: {alpha_schedule!r}; expected 'cosine' or 'constant'")
        self.sfron_kwargs = dict(sfron_kwargs or {})
        self.masks = masks
        self.forget_freq = forget_freq
        self.alpha_schedule = alpha_schedule
        check_weight_args(lambd, loss_floor)
        if sequence_loss not in ("mean", "sum"):
            raise ValueError(f"Invalid sequence_loss: {sequence_loss!r}; expected 'mean' or 'sum'")
        self.lambd, self.loss_floor, self.sequence_loss = lambd, loss_floor, sequence_loss
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"SFRonTrainer needs gradient_accumulation_steps=1 (a forget step is a whole optimizer "
                             f"step), got {self.args.gradient_accumulation_steps}")
        if self.args.remove_unused_columns:
            # the batches are {"forget": ..., "retain": ...}; column filtering by forward() would drop both
            self.args.remove_unused_columns = False

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
            kwargs = {"lr": self.args.learning_rate, **self.sfron_kwargs}
            self.optimizer = SFRon([g for g in groups if g["params"]], **kwargs)
            if self.masks is not None:
                self.optimizer.set_masks(self.masks)
        return self.optimizer

    def forget_alpha_at(self, step: int) -> float:
        """α of the forget step taken at optimizer step ``step``."""
        base = self.sfron_kwargs.get("forget_alpha", 1.0)
        if self.alpha_schedule == "constant" or self.state.max_steps <= 0:
            return base
        return base * (1 + math.cos(math.pi * step / self.state.max_steps)) / 2

    # ------------------------------------------------------------------ steps
    def compute_forget_loss(self, model, inputs):
        r"""The adaptive forget loss :math:`\operatorname{mean}_i(w_i \ell_i)` of a forget batch (positive)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        losses = per_sample_loss(logits, labels, self.sequence_loss)
        return (adaptive_weights(losses, self.lambd, self.loss_floor) * losses).mean()

    def forget_step(self, model, forget_inputs) -> torch.Tensor:
        """One forget-phase optimizer step on ``forget_inputs``; returns the forget loss."""
        alpha = self.forget_alpha_at(self.state.global_step)
        for group in unwrap_optimizer(self.optimizer).param_groups:
            group["forget_alpha"] = alpha
        model.train()
        forget_inputs = self._prepare_inputs(forget_inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_forget_loss(model, forget_inputs)
        self.accelerator.backward(loss)
        with phase(self.optimizer, "forget"):
            self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not (isinstance(inputs, dict) and "forget" in inputs and "retain" in inputs):
            raise ValueError("SFRonTrainer batches are {'forget': ..., 'retain': ...} "
                             "(ForgetRetainDataset + ForgetRetainCollator build them)")
        if self.state.global_step % self.forget_freq == 0:
            self.last_forget_loss = self.forget_step(model, inputs["forget"])
        return super().training_step(model, inputs["retain"], num_items_in_batch)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # count label tokens of the retain side (the batch the Trainer's own loss uses)
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        retain = [b["retain"] if isinstance(b, dict) and "retain" in b else b for b in batch_samples]
        return batch_samples, self._get_num_items_in_batch(retain, device)

    def floating_point_ops(self, inputs):
        return super().floating_point_ops(inputs.get("retain", inputs) if isinstance(inputs, dict) else inputs)
