"""``foreach`` kernels: the reference math on one flat float32 buffer per list.

Same signatures and semantics as :mod:`sfron_ops.reference`. A call reads each
list as one contiguous float32 tensor, does the reference's arithmetic on those,
operation for operation, and writes each mutated list back. So a call costs the
same handful of ops whatever the number of tensors, with no Python loop over
tensors and no host read of a device value: a skipped step (non-finite flag set) is a
``torch.where`` between the old and the new flat values, and step counters
advance by ``1 - flag``.

How a list is read and written depends on its memory:

- a list that is, in order, the consecutive pieces of one 1-D tensor (its
  *block*: the optimizer allocates its state so, see :mod:`sfron_ops._state`) is
  read as that tensor and written with one op (:class:`_Blocks`);
- any other list is copied into a new buffer (``torch._utils``'s
  ``_flatten_dense_tensors``, one op) and written back with one
  ``torch._foreach_copy_`` from views of a float32 buffer that each thread keeps
  for the last few list shapes it wrote (:class:`_Layout`): making the views
  costs more than the arithmetic on small tensors.

Within an optimizer step (:func:`sfron_ops._ops.step_scope`) the masked
gradients are made once and shared by the norm and the update.

The updates round exactly as the reference does. The sum of squares of
``masked_sq_norm_`` is one sum over the flat buffer, so it agrees with the
reference's per-tensor sums to float32 rounding.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import _ops
from .reference import clip_and_skip, decay_factor, lerp, scalar, sync_due


def _flat32(tensors) -> torch.Tensor:
    """The elements of a list, in order, as a new contiguous float32 tensor (never a view of an input)."""
    flat = _flatten_dense_tensors(tensors)
    if flat.dtype != torch.float32:
        return flat.to(torch.float32)
    # a one-tensor list flattens to a view of that tensor
    return flat.clone() if len(tensors) == 1 else flat


class _Blocks:
    """Finds the block of a list: the 1-D tensor whose consecutive contiguous pieces its tensors are, in order.

    A list's block is found once (remembered by the tensors' identities, without holding anything
    alive) and checked on every call by the tensors' addresses, in case a tensor got new ``.data``
    since (which leaves its ``_base`` as it was).
    """

    _cache = threading.local()
    LIMIT = 32  # lists remembered per thread

    @classmethod
    def of(cls, tensors) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or tensors[0]._base is None:
            return None
        cache = cls._cache.__dict__.setdefault("blocks", {})
        key = tuple(map(id, tensors))
        found = cache.get(key)
        block = None if found is None else found[0]()
        addresses = tuple(map(torch.Tensor.data_ptr, tensors))
        if block is None:
            block = cls._find(tensors, addresses)
            if block is None:
                return None
            cache[key] = found = (weakref.ref(block), addresses)
            while len(cache) > cls.LIMIT:
                del cache[next(iter(cache))]
        # while the block lives no other tensor can have its addresses
        return block if addresses == found[1] else None

    @staticmethod
    def _find(tensors, addresses) -> torch.Tensor | None:
        block = tensors[0]._base
        if block.dim() != 1 or not block.is_contiguous():
            return None
        at = block.data_ptr()
        for t, address in zip(tensors, addresses):
            # (an empty tensor's address is 0)
            if t._base is not block or t.dtype != block.dtype or not t.is_contiguous() or (t.numel() and address != at):
                return None
            at += t.numel() * t.element_size()
        return block if at == block.data_ptr() + block.numel() * block.element_size() else None


class _Layout:
    """A flat float32 buffer the size of one list, its view per tensor and each tensor's element count
    (on the list's device), made once per list shape and thread and then reused."""

    _cache = threading.local()  # per thread, so that concurrent steps never share a buffer
    LIMIT = 8  # layouts kept per thread

    def __init__(self, like):
        self.flat = torch.empty(sum(t.numel() for t in like), dtype=torch.float32, device=like[0].device)
        self.views = _unflatten_dense_tensors(self.flat, like)
        numels = [t.numel() for t in like]
        self.numels = torch.tensor(numels, dtype=torch.int64).to(self.flat.device)
        # where each tensor's first element sits in its packed mask's bits over the whole list, less its position
        starts = [0] + list(itertools.accumulate(numels))[:-1]
        first_bytes = [0] + list(itertools.accumulate((n + 7) // 8 for n in numels))[:-1]
        self.bit_shifts = torch.tensor([8 * b - e for b, e in zip(first_bytes, starts)],
                                       dtype=torch.int64).to(self.flat.device)

    @classmethod
    def of(cls, like) -> "_Layout":
        cache = cls._cache.__dict__.setdefault("layouts", {})
        key = (like[0].device, tuple(map(torch.Tensor.size, like)))
        layout = cache.pop(key, None) or cls(like)
        cache[key] = layout  # most recently used last
        while len(cache) > cls.LIMIT:
            del cache[next(iter(cache))]
        return layout


def _read(tensors) -> torch.Tensor:
    """A list's elements, in order, as one flat float32 tensor that must not be written (a float32 block
    is that block itself)."""
    block = _Blocks.of(tensors)
    if block is None:
        return _flat32(tensors)
    return block if block.dtype == torch.float32 else block.to(torch.float32)


def _write(dsts, layout: _Layout, new: torch.Tensor, skip=None, old: torch.Tensor | None = None) -> None:
    """Write the flat ``new`` into the list ``dsts`` (shaped as ``layout``); where ``skip`` is set, ``old``."""
    block = _Blocks.of(dsts)
    out = block if block is not None and block.dtype == new.dtype else layout.flat
    if skip is None:
        out.copy_(new)
    else:
        torch.where(skip, old, new, out=out)
    if block is None:
        torch._foreach_copy_(dsts, layout.views)
    elif out is not block:
        block.copy_(out)


def _counters(steps) -> torch.Tensor:
    """The 0-dim float32 step counters as one 1-D tensor that must not be written."""
    block = _Blocks.of(steps)
    return torch.stack(steps) if block is None else block


def _per_element(values: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """``values`` (one per tensor of the layout's list) repeated over each tensor's elements, as a new flat tensor."""
    # the output size given, an accelerator need not send it back to the host
    return torch.repeat_interleave(values, layout.numels, output_size=layout.flat.numel())


def _flat_masks(masks, like, packed: bool) -> torch.Tensor:
    """The masks' factors as a flat float32 buffer aligned with ``like``'s elements."""
    if not packed:
        return _read(masks)
    layout = _Layout.of(like)
    data = _Blocks.of(masks)
    data = _flatten_dense_tensors(masks) if data is None else data
    bits = ((data.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=data.device)) & 1).reshape(-1)
    # each tensor's bits start on a byte, after the padding bits of the one before: element e of tensor i sits
    # at bit e + (8 * its first byte - its first element)
    index = torch.arange(layout.flat.numel(), device=data.device) + _per_element(layout.bit_shifts, layout)
    return bits[index].to(torch.float32)


def _masked(grads, masks, packed: bool, like) -> torch.Tensor:
    """g * m (g itself without masks) as a flat float32 tensor that must not be written.

    Within a step nothing writes the gradients, so it is made once per list there and shared by the
    norm and the update.
    """
    memo = _ops.step_memo()
    key = memo is not None and (tuple(map(id, grads)), tuple(map(id, masks)))
    if key and key in memo:
        return memo[key][0]
    u = _read(grads)
    if masks:
        u = u * _flat_masks(masks, like, packed)
    if key:
        memo[key] = (u, grads, masks)  # the lists keep the tensors behind the ids alive
    return u


def _direction(grads, masks, coef, packed=False, like=None) -> torch.Tensor:
    """u = (g * m) * coef as a flat float32 tensor that must not be written; ``grads`` are only read."""
    u = _masked(grads, masks, packed, grads if like is None else like)
    # a product with exactly one is the other factor
    return u if isinstance(coef, (int, float)) and coef == 1 else u * coef


def _advance(steps, skip) -> None:
    step = 1.0 if skip is None else 1.0 - skip.float()
    block = _Blocks.of(steps)
    if block is not None:
        block.add_(step)
        return
    # the list overload: adding one 0-dim tensor (or a number) to a list of 0-dim counters takes a per-tensor slow
    # path in torch that costs about three times as much
    if skip is None:
        step = torch.ones((), device=steps[0].device)
    torch._foreach_add_(steps, [step] * len(steps))


def masked_sq_norm_(grads, masks, norm_state, *, alpha, packed_masks=False, alpha_tensor=None):
    _ops.validate("masked_norm", grads, masks, norm_state, alpha=alpha, packed_masks=packed_masks,
                  alpha_tensor=alpha_tensor)
    if not grads:
        return
    u = _direction(grads, masks, scalar(alpha, alpha_tensor), packed_masks)
    norm_state[0] += (u * u).sum()
    # u * 0 is 0 where u is finite and NaN elsewhere: one sum tells whether any element is not finite
    norm_state[1] = torch.maximum(norm_state[1], (u * 0).sum().isnan().float())


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
    p32 = _read(params)
    d = _direction(grads, masks, coef, packed_masks, params)
    if weight_decay != 0:
        d = d + weight_decay * p32
    if momentum != 0:
        buf32 = _read(momentum_buffers)
        # the buffer starts as d itself (torch.optim.SGD clones the first gradient)
        first = _per_element(_counters(steps) == 0, layout)
        new_buf = torch.where(first, d, momentum * buf32 + ((1 - dampening) * d if dampening else d))
        d = d + momentum * new_buf if nesterov else new_buf
        _write(momentum_buffers, layout, new_buf, skip, buf32)
    _write(params, layout, p32 - lr * d, skip, p32)
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
    m1_old, m2_old, p32 = _read(exp_avgs), _read(exp_avg_sqs), _read(params)
    t = _counters(steps) + 1
    bias1 = _per_element(1 - torch.pow(beta1, t), layout)
    bias2 = _per_element(1 - torch.pow(beta2, t), layout)
    m1 = beta1 * m1_old + (1 - beta1) * u
    m2 = beta2 * m2_old + (1 - beta2) * u * u
    denom = (m2 / bias2).sqrt() + eps
    new_p = p32 * decay - lr * (m1 / bias1) / denom
    _write(exp_avgs, layout, m1, skip, m1_old)
    _write(exp_avg_sqs, layout, m2, skip, m2_old)
    _write(params, layout, new_p, skip, p32)
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
    ratio = (_read(forget_fishers) + _ops.RATIO_EPS) / (_read(remain_fishers) + _ops.RATIO_EPS)
    keep = ratio >= torch.tensor(gamma, dtype=torch.float32, device=ratio.device)
    _write(masks, _Layout.of(masks), keep)
    kept += keep.sum()


def slow_sync_(slow_params, params, *, alpha, reset_fast, norm_state=None, counter=None, period=1):
    _ops.validate("slow_sync", slow_params, params, alpha=alpha, reset_fast=reset_fast, norm_state=norm_state,
                  counter=counter, period=period)
    if not params:
        return
    due = sync_due(norm_state, counter, period)
    keep = None if due is None else ~due
    s32, p32 = _read(slow_params), _read(params)
    layout = _Layout.of(params)
    _write(slow_params, layout, lerp(s32, p32, alpha), keep, s32)
    if reset_fast:
        # the slow weights as stored (rounded to their dtype), as the reference copies them
        _write(params, layout, _read(slow_params), keep, p32)
