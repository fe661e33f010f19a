"""``foreach`` kernels: the reference math on one flat float32 buffer per list.

Same signatures and semantics as :mod:`sfron_ops.reference`. A call copies each
list it reads into one contiguous float32 buffer (``torch._utils``'s
``_flatten_dense_tensors``: one op for the whole list), does the reference's
arithmetic on those buffers, operation for operation, and writes each mutated
list back with one ``torch._foreach_copy_``. So a call costs the same handful of
ops whatever the number of tensors, with no Python loop over tensors (packed
masks aside: their padding bits are dropped tensor by tensor) and no host read of
a device value: a skipped step (non-finite flag set) is a ``torch.where`` between
the old and the new flat values, and step counters advance by ``1 - flag``.

Writing back needs a view of the flat values per tensor, and making those views
costs more than the arithmetic on small tensors; so each thread keeps a float32
buffer with its views for the last few list shapes it wrote (:class:`_Layout`), the
size of one list: memory traded for about a third of the host time of a step.

The updates round exactly as the reference does. The sum of squares of
``masked_sq_norm_`` is one sum over the flat buffer, so it agrees with the
reference's per-tensor sums to float32 rounding.
"""

from __future__ import annotations

import threading

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import _ops
from .reference import clip_and_skip, decay_factor, lerp, scalar, sync_due, unpack_mask


def _flat32(tensors) -> torch.Tensor:
    """The elements of a list, in order, as a new contiguous float32 tensor (never a view of an input)."""
    flat = _flatten_dense_tensors(tensors)
    if flat.dtype != torch.float32:
        return flat.to(torch.float32)
    # a one-tensor list flattens to a view of that tensor
    return flat.clone() if len(tensors) == 1 else flat


class _Layout:
    """A flat float32 buffer the size of one list, its view per tensor and each tensor's element count
    (on the list's device), made once per list shape and thread and then reused."""

    _cache = threading.local()  # per thread, so that concurrent steps never share a buffer
    LIMIT = 8  # layouts kept per thread

    def __init__(self, like):
        self.flat = torch.empty(sum(t.numel() for t in like), dtype=torch.float32, device=like[0].device)
        self.views = _unflatten_dense_tensors(self.flat, like)
        self.numels = torch.tensor([t.numel() for t in like], dtype=torch.int64).to(self.flat.device)

    @classmethod
    def of(cls, like) -> "_Layout":
        cache = cls._cache.__dict__.setdefault("layouts", {})
        key = (like[0].device, tuple(map(torch.Tensor.size, like)))
        layout = cache.pop(key, None) or cls(like)
        cache[key] = layout  # most recently used last
        while len(cache) > cls.LIMIT:
            del cache[next(iter(cache))]
        return layout


def _per_element(values: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """``values`` (one per tensor of the layout's list) repeated over each tensor's elements, as a new flat tensor."""
    # the output size given, an accelerator need not send it back to the host
    return torch.repeat_interleave(values, layout.numels, output_size=layout.flat.numel())


def _flat_masks(masks, like, packed: bool) -> torch.Tensor:
    """The masks' factors as a flat float32 buffer aligned with ``like``'s elements."""
    if not packed:
        return _flat32(masks)
    # each tensor's last byte holds padding bits: unpacked tensor by tensor
    return _flat32([unpack_mask(m, t) for m, t in zip(masks, like)])


def _direction(grads, masks, coef, packed=False, like=None) -> torch.Tensor:
    """u = (g * m) * coef as a new flat float32 buffer; ``grads`` are only read."""
    u = _flat32(grads)
    if masks:
        u = u * _flat_masks(masks, grads if like is None else like, packed)
    return u * coef


def _commit(dsts, layout: _Layout, new: torch.Tensor, skip, old: torch.Tensor | None = None) -> None:
    """Write the flat ``new`` into the list ``dsts`` (shaped as ``layout``); where ``skip`` is set, ``old``."""
    if skip is None:
        layout.flat.copy_(new)
    else:
        torch.where(skip, old, new, out=layout.flat)
    torch._foreach_copy_(dsts, layout.views)


def _advance(steps, skip) -> None:
    # the list overload: adding one 0-dim tensor (or a number) to a list of 0-dim counters takes a per-tensor slow
    # path in torch that costs about three times as much
    step = torch.ones((), device=steps[0].device) if skip is None else 1.0 - skip.float()
    torch._foreach_add_(steps, [step] * len(steps))


def masked_sq_norm_(grads, masks, norm_state, *, alpha, packed_masks=False, alpha_tensor=None):
    _ops.validate("masked_norm", grads, masks, norm_state, alpha=alpha, packed_masks=packed_masks,
                  alpha_tensor=alpha_tensor)
    if not grads:
        return
    u = _direction(grads, masks, scalar(alpha, alpha_tensor), packed_masks)
    norm_state[0] += (u * u).sum()
    norm_state[1] = torch.maximum(norm_state[1], (~torch.isfinite(u)).any().float())


def sgd_update_(params, grads, masks, momentum_buffers, steps, norm_state, *, lr, scale, momentum, dampening,
                weight_decay, nesterov, max_norm, packed_masks=False, lr_tensor=None, scale_tensor=None):
    _ops.validate("sgd_update", params, grads, masks, momentum_buffers, steps, norm_state, lr=lr, scale=scale,
                  momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                  max_norm=max_norm, packed_masks=packed_masks, lr_tensor=lr_tensor, scale_tensor=scale_tensor)
    if not params:
        return
    lr = scalar(lr, lr_tensor)
    coef, skip = clip_and_skip(norm_state, scale, max_norm, params[0].device, scale_tensor)
    layout = _Layout.of(params)
    p32 = _flat32(params)
    d = _direction(grads, masks, coef, packed_masks, params)
    if weight_decay != 0:
        d = d + weight_decay * p32
    if momentum != 0:
        buf32 = _flat32(momentum_buffers)
        # the buffer starts as d itself (torch.optim.SGD clones the first gradient)
        first = _per_element(torch.stack(steps) == 0, layout)
        new_buf = torch.where(first, d, momentum * buf32 + (1 - dampening) * d)
        d = d + momentum * new_buf if nesterov else new_buf
        _commit(momentum_buffers, layout, new_buf, skip, buf32)
    _commit(params, layout, p32 - lr * d, skip, p32)
    _advance(steps, skip)


def adamw_update_(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, *, lr, scale, beta1, beta2, eps,
                  weight_decay, max_norm, packed_masks=False, lr_tensor=None, scale_tensor=None):
    _ops.validate("adamw_update", params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, lr=lr, scale=scale,
                  beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_norm=max_norm,
                  packed_masks=packed_masks, lr_tensor=lr_tensor, scale_tensor=scale_tensor)
    if not params:
        return
    lr = scalar(lr, lr_tensor)
    decay = decay_factor(lr, weight_decay)
    coef, skip = clip_and_skip(norm_state, scale, max_norm, params[0].device, scale_tensor)
    u = _direction(grads, masks, coef, packed_masks, params)
    layout = _Layout.of(params)
    m1_old, m2_old, p32 = _flat32(exp_avgs), _flat32(exp_avg_sqs), _flat32(params)
    t = torch.stack(steps) + 1
    bias1 = _per_element(1 - torch.pow(beta1, t), layout)
    bias2 = _per_element(1 - torch.pow(beta2, t), layout)
    m1 = beta1 * m1_old + (1 - beta1) * u
    m2 = beta2 * m2_old + (1 - beta2) * u * u
    denom = (m2 / bias2).sqrt() + eps
    new_p = p32 * decay - lr * (m1 / bias1) / denom
    _commit(exp_avgs, layout, m1, skip, m1_old)
    _commit(exp_avg_sqs, layout, m2, skip, m2_old)
    _commit(params, layout, new_p, skip, p32)
    _advance(steps, skip)


def fisher_accumulate_(fishers, grads, *, scale):
    _ops.validate("fisher_accumulate", fishers, grads, scale=scale)
    if fishers:
        g32 = [g if g.dtype == torch.float32 else g.to(torch.float32) for g in grads]
        torch._foreach_addcmul_(fishers, g32, g32, value=scale)


def saliency_mask_(forget_fishers, remain_fishers, masks, kept, *, gamma):
    _ops.validate("saliency_mask", forget_fishers, remain_fishers, masks, kept, gamma=gamma)
    if not masks:
        return
    ratio = (_flat32(forget_fishers) + _ops.RATIO_EPS) / (_flat32(remain_fishers) + _ops.RATIO_EPS)
    keep = ratio >= torch.tensor(gamma, dtype=torch.float32, device=ratio.device)
    _commit(masks, _Layout.of(masks), keep, None)
    kept += keep.sum()


def slow_sync_(slow_params, params, *, alpha, reset_fast, norm_state=None, counter=None, period=1):
    _ops.validate("slow_sync", slow_params, params, alpha=alpha, reset_fast=reset_fast, norm_state=norm_state,
                  counter=counter, period=period)
    if not params:
        return
    due = sync_due(norm_state, counter, period)
    keep = None if due is None else ~due
    s32, p32 = _flat32(slow_params), _flat32(params)
    layout = _Layout.of(params)
    _commit(slow_params, layout, lerp(s32, p32, alpha), keep, s32)
    if reset_fast:
        # the slow weights as stored (rounded to their dtype), as the reference copies them
        _commit(params, layout, _flat32(slow_params), keep, p32)

