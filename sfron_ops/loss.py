r"""(F) sample-wise adaptive weighting of the forget loss.

.. math::
   c_i = \frac{1}{\max(\operatorname{detach}(\ell_i), f)^{\lambda} + \epsilon}, \qquad
   w_i = N \frac{c_i}{\sum_j c_j}, \qquad
   \mathcal{L}_f = \frac1N \sum_i w_i \ell_i

The official formula has no floor (``loss_floor=None``). Without one, a sample whose float32 loss is
exactly zero (a model that fits its training set has some) gets :math:`c_i \approx 10^{15}`: the
whole batch's weight sits on samples whose gradient is zero and the ascent does nothing. With the
floor :math:`f` (``LOSS_FLOOR`` by default) a fully fitted sample weighs as much as a sample of
loss :math:`f`. :math:`\epsilon` (``eps``) is :math:`10^{-15}`, as in the official classification code
(its diffusion code uses :math:`10^{-8}`).
:mod:`sfron_ops.distributed` reuses these pieces with :math:`N` and :math:`\sum_j c_j` taken over every rank.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

WEIGHT_EPS = 1e-15
#: the default floor under the per-sample losses of the weights (``loss_floor=None``: the official formula)
LOSS_FLOOR = 1e-4

__all__ = ["AdaptiveLoss", "adaptive_cross_entropy", "adaptive_weights", "ZeroForgetLossWarning", "LOSS_FLOOR"]


class ZeroForgetLossWarning(UserWarning):
    """A forget batch holds samples of loss exactly 0 and the adaptive weights have no floor."""


_zero_loss_warned = False


def check_weight_args(lambd, loss_floor) -> None:
    """A ``ValueError`` naming ``lambd`` or ``loss_floor`` unless each is a finite number >= 0 (the floor: or None)."""
    if isinstance(lambd, bool) or not isinstance(lambd, (int, float)) or not 0 <= lambd < math.inf:
        raise ValueError(f"Invalid lambd: {lambd!r}; expected a finite number >= 0")
    if loss_floor is not None and (isinstance(loss_floor, bool) or not isinstance(loss_floor, (int, float))
                                   or not 0 <= loss_floor < math.inf):
        raise ValueError(f"Invalid loss_floor: {loss_floor!r}; expected a finite number >= 0 or None")


def _warn_zero_losses(losses: torch.Tensor) -> None:
    # one host sync per forget batch, only without a floor and only until the first warning
    global _zero_loss_warned
    if _zero_loss_warned or torch.compiler.is_compiling():
        return
    zeros = int((losses == 0).sum())
    if zeros:
        _zero_loss_warned = True
        warnings.warn(
            f"{zeros} of {losses.numel()} forget samples have a loss of exactly 0 and loss_floor is None: their "
            "adaptive weight is ~1e15 and their gradient ~0, so the forget step barely moves the model. Pass "
            f"loss_floor (the default, {LOSS_FLOOR:g}) unless you need the official formula bit for bit.",
            ZeroForgetLossWarning, stacklevel=4)


def inverse_loss_powers(losses: torch.Tensor, lambd: float = 0.5, loss_floor: float | None = LOSS_FLOOR, *,
                        eps: float = WEIGHT_EPS):
    r""":math:`c_i = 1 / (\max(\ell_i, f)^\lambda + \epsilon)` in float32, detached: the unnormalised weights."""
    if losses.dim() != 1:
        raise ValueError(f"losses must be a 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}")
    check_weight_args(lambd, loss_floor)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"Invalid eps: {eps!r}; expected a finite number >= 0")
    detached = losses.detach().float()
    if loss_floor:
        detached = detached.clamp_min(loss_floor)
    else:
        _warn_zero_losses(detached)
    return 1.0 / (detached.pow(lambd) + eps)


def normalise_weights(c: torch.Tensor, count, total, dtype: torch.dtype) -> torch.Tensor:
    r""":math:`w_i = N c_i / \sum_j c_j` with ``count`` = N and ``total`` = the sum (local or over ranks)."""
    return (count * c / total).to(dtype)


def adaptive_weights(losses: torch.Tensor, lambd: float = 0.5, loss_floor: float | None = LOSS_FLOOR, *,
                     eps: float = WEIGHT_EPS) -> torch.Tensor:
    r"""Per-sample weights that push hardest on the samples the model still fits.

    .. math::
       c_i = \frac{1}{\max(\operatorname{detach}(\ell_i), f)^{\lambda} + \epsilon}, \qquad
       w_i = N \frac{c_i}{\sum_j c_j}

    The weights carry no gradient and average to one. ``loss_floor`` is :math:`f` (default
    ``LOSS_FLOOR`` = 1e-4); ``loss_floor=None`` is the official formula, which warns
    (:class:`ZeroForgetLossWarning`, once per process) the first time a batch holds a loss of exactly 0.
    ``eps`` is :math:`\epsilon`, :math:`10^{-15}` as in the official classification code (its diffusion code
    uses :math:`10^{-8}`).
    """
    if losses.numel() == 0:
        # the mean of no weighted losses is NaN, and a step on it would move nothing the user meant to forget
        raise ValueError("adaptive_weights: the forget batch is empty (losses has shape "
                         f"{tuple(losses.shape)}); each forget step needs at least one sample")
    c = inverse_loss_powers(losses, lambd, loss_floor, eps=eps)
    return normalise_weights(c, losses.numel(), c.sum(), losses.dtype)


class AdaptiveLoss(nn.Module):
    r"""The adaptive forget loss :math:`\operatorname{mean}_i(w_i \ell_i)`, positive.

    ``loss_fn(output, target)`` must return per-sample losses (``reduction="none"``);
    the default is cross-entropy. The optimizer's forget phase does the ascent:
    do not negate this loss. ``lambd`` and ``loss_floor`` are those of :func:`adaptive_weights`
    (``loss_floor=None``: the official formula).
    """

    def __init__(self, loss_fn=None, lambd: float = 0.5, loss_floor: float | None = LOSS_FLOOR):
        super().__init__()
        if loss_fn is None:
            loss_fn = nn.CrossEntropyLoss(reduction="none")
        reduction = getattr(loss_fn, "reduction", "none")
        if reduction != "none":
            raise ValueError(f"loss_fn must return per-sample losses (reduction='none'), got reduction={reduction!r}")
        check_weight_args(lambd, loss_floor)
        self.loss_fn = loss_fn
        self.lambd = lambd
        self.loss_floor = loss_floor

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return adaptive_weights(losses, self.lambd, self.loss_floor)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(output, target)
        if losses.dim() != 1:
            raise ValueError(f"loss_fn returned shape {tuple(losses.shape)}; expected one loss per sample")
        return (self.weights(losses) * losses).mean()

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, loss_floor={self.loss_floor}"


def adaptive_cross_entropy(output: torch.Tensor, target: torch.Tensor, lambd: float = 0.5,
                           loss_floor: float | None = LOSS_FLOOR) -> torch.Tensor:
    """:class:`AdaptiveLoss` with cross-entropy, as a function."""
    losses = F.cross_entropy(output, target, reduction="none")
    return (adaptive_weights(losses, lambd, loss_floor) * losses).mean()
