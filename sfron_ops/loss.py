"""(F) sample-wise adaptive weighting of the forget loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WEIGHT_EPS = 1e-15


def adaptive_weights(losses: torch.Tensor, lambd: float = 0.5, *, eps: float = WEIGHT_EPS) -> torch.Tensor:
    r"""Per-sample weights that push hardest on the samples the model still fits.

    .. math::
       c_i = \frac{1}{\operatorname{detach}(\ell_i)^{\lambda} + \epsilon}, \qquad
       w_i = N \frac{c_i}{\sum_j c_j}

    The weights carry no gradient and average to one. :math:`\epsilon` (``eps``) is
    :math:`10^{-15}` as in the official classification code; its diffusion code uses :math:`10^{-8}`.
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must be a 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}")
    if isinstance(lambd, bool) or not isinstance(lambd, (int, float)) or lambd < 0:
        raise ValueError(f"Invalid lambd: {lambd!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"Invalid eps: {eps!r}")
    c = 1.0 / (losses.detach().float().pow(lambd) + eps)
    return (losses.numel() * c / c.sum()).to(losses.dtype)


class AdaptiveLoss(nn.Module):
    r"""The adaptive forget loss :math:`\operatorname{mean}_i(w_i \ell_i)`, positive.

    ``loss_fn(output, target)`` must return per-sample losses (``reduction="none"``);
    the default is cross-entropy. The optimizer's forget phase does the ascent:
    do not negate this loss.
    """

    def __init__(self, loss_fn=None, lambd: float = 0.5):
        super().__init__()
        if loss_fn is None:
            loss_fn = nn.CrossEntropyLoss(reduction="none")
        reduction = getattr(loss_fn, "reduction", "none")
        if reduction != "none":
            raise ValueError(f"loss_fn must return per-sample losses (reduction='none'), got reduction={reduction!r}")
        if isinstance(lambd, bool) or not isinstance(lambd, (int, float)) or lambd < 0:
            raise ValueError(f"Invalid lambd: {lambd!r}")
        self.loss_fn = loss_fn
        self.lambd = lambd

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(output, target)
        if losses.dim() != 1:
            raise ValueError(f"loss_fn returned shape {tuple(losses.shape)}; expected one loss per sample")
        return (adaptive_weights(losses, self.lambd) * losses).mean()


def adaptive_cross_entropy(output: torch.Tensor, target: torch.Tensor, lambd: float = 0.5) -> torch.Tensor:
    """:class:`AdaptiveLoss` with cross-entropy, as a function."""
    losses = F.cross_entropy(output, target, reduction="none")
    return (adaptive_weights(losses, lambd) * losses).mean()
