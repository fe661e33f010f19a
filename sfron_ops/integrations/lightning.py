r"""PyTorch Lightning: SFR-on with manual optimisation.

SFR-on takes two optimizer steps per iteration, so it runs with
``automatic_optimization = False``. ``LightningOptimizer.step`` forwards keyword
arguments, so ``self.optimizers().step(phase="forget")`` reaches SFRon, and the
precision plugin (autocast, ``bf16-mixed``) wraps both steps. :class:`SFRonModule`
is that ``training_step`` ready-made: subclass it, define :meth:`forget_loss` and
:meth:`remain_loss` for one batch each, and return an SFRon (and optionally an LR
scheduler, stepped once per iteration) from ``configure_optimizers``. Batches are
``{"forget": ..., "retain": ...}``.

Lightning counts every ``optimizer.step()`` in ``trainer.global_step``, so an
iteration with a forget step advances it by two: bound runs with ``max_epochs`` or
``limit_train_batches`` rather than ``max_steps``. ``forget_freq`` and the α schedule
count iterations (:attr:`SFRonModule.sfron_iteration`, saved in checkpoints).
Lightning refuses gradient clipping by the Trainer in manual optimisation; SFRon
clips in its step (``max_grad_norm``, ``remain_max_grad_norm``).
"""

from __future__ import annotations

import math

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from . import unwrap_optimizer

__all__ = ["SFRonModule"]


class SFRonModule(pl.LightningModule):
    r"""A LightningModule whose ``training_step`` is one SFR-on iteration.

    Every ``forget_freq`` iterations: ``forget_loss(batch["forget"])``, backward,
    ``step(phase="forget")`` with
    :math:`\alpha_i = \alpha (1 + \cos(\pi i / n)) / 2` (``alpha_schedule="cosine"``,
    :math:`\alpha` the optimizer's ``forget_alpha`` at the first iteration, ``n`` =
    ``total_iterations`` or the Trainer's estimate). Then, every iteration:
    ``remain_loss(batch["retain"])``, backward, a remain step, and the LR scheduler.
    """

    def __init__(self, forget_freq: int = 1, alpha_schedule: str = "cosine", total_iterations: int | None = None):
        super().__init__()
        if isinstance(forget_freq, bool) or not isinstance(forget_freq, int) or forget_freq < 1:
            raise ValueError(f"Invalid forget_freq: {forget_freq!r}")
        if alpha_schedule not in ("cosine", "constant"):
            raise ValueError(f"Invalid alpha_schedule: {alpha_schedule!r}; expected 'cosine' or 'constant'")
        self.automatic_optimization = False
        self.forget_freq = forget_freq
        self.alpha_schedule = alpha_schedule
        self.total_iterations = total_iterations
        self.sfron_iteration = 0
        self._base_alpha = None

    def forget_loss(self, batch):
        """The (positive) adaptive forget loss of one forget batch, e.g. :func:`sfron_ops.adaptive_cross_entropy`."""
        raise NotImplementedError

    def remain_loss(self, batch):
        """The loss of one retain batch."""
        raise NotImplementedError

    def forget_alpha_at(self, iteration: int) -> float:
        n = self.total_iterations or int(self.trainer.estimated_stepping_batches)
        if self.alpha_schedule == "constant" or n <= 0:
            return self._base_alpha
        return self._base_alpha * (1 + math.cos(math.pi * iteration / n)) / 2

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sfron = unwrap_optimizer(opt)
        if self._base_alpha is None:
            self._base_alpha = sfron.param_groups[0]["forget_alpha"]
        if self.sfron_iteration % self.forget_freq == 0:
            alpha = self.forget_alpha_at(self.sfron_iteration)
            for group in sfron.param_groups:
                group["forget_alpha"] = alpha
            forget = self.forget_loss(batch["forget"])
            self.manual_backward(forget)
            opt.step(phase="forget")  # LightningOptimizer forwards the phase to SFRon
            opt.zero_grad()
            self.log("forget_loss", forget.detach(), prog_bar=True)
        remain = self.remain_loss(batch["retain"])
        self.manual_backward(remain)
        opt.step()
        opt.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.sfron_iteration += 1
        self.log("remain_loss", remain.detach(), prog_bar=True)
        return remain.detach()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["sfron_iteration"] = self.sfron_iteration
        checkpoint["sfron_base_alpha"] = self._base_alpha

    def on_load_checkpoint(self, checkpoint):
        self.sfron_iteration = checkpoint.get("sfron_iteration", 0)
        self._base_alpha = checkpoint.get("sfron_base_alpha")
