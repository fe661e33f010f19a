"""Reference kernels: plain PyTorch, one tensor at a time, float32 math.

These functions are the ground truth for every backend. They are registered
as the default (``CompositeExplicitAutograd``) kernel of each op in
:mod:`sfron_ops._ops`, so the ops run anywhere, and compiled kernels override
them per device. Tests and benchmarks import them directly.

Each function computes its docstring's formula literally; skipping a step on a non-finite
direction is done with ``torch.where`` so that nothing here needs the host to
look at device values.
"""

from __future__ import annotations

import torch

from . import _ops

CLIP_EPS = 1e-6


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _direction(g: torch.Tensor, m: torch.Tensor | None, coef) -> torch.Tensor:
    """u = (g * m) * coef in float32. ``g`` itself is never modified."""
    u = _f32(g)
    if m is not None:
        u = u * _f32(m)
    return u * coef


def device_scalar(value, device) -> torch.Tensor:
    """A float32 0-dim tensor on ``device`` from a number or a tensor (a tensor lr or alpha).

    A number is written by a fill on the device rather than copied from the host,
    so a step stays capturable in a CUDA graph.
    """
    if torch.is_tensor(value):
        return value.to(device=device, dtype=torch.float32)
    return torch.full((), value, dtype=torch.float32, device=device)


def scalar(value: float, tensor, device=None):
    """``value`` times the optional tensor scalar that multiplies it (an op's ``*_tensor`` argument).

    Without a tensor, the number itself (with ``device``: as a float32 0-dim tensor there).
    """
    if tensor is None:
        return value if device is None else device_scalar(value, device)
    return device_scalar(value, tensor.device) * tensor


def decay_factor(lr, weight_decay: float):
    """AdamW's ``1 - lr * wd``, in float64 from the float32 tensor or the Python ``lr``, on every backend."""
    if torch.is_tensor(lr):
        return 1 - lr.double() * weight_decay
    return 1 - lr * weight_decay


def clip_and_skip(norm_state, scale: float, max_norm: float, device, scale_tensor=None):
    """The direction coefficient ``scale * c`` and the skip flag (``None`` without a norm state).

    c = min(1, max_norm / (sqrt(norm_state[0]) + 1e-6)) when ``max_norm > 0``,
    as ``torch.nn.utils.clip_grad_norm_`` computes it. The coefficient is a tensor on the
    device with a clip or a ``scale_tensor``, and the number ``scale`` otherwise.
    """
    if norm_state is None or not max_norm > 0:
        # a number stays a number: multiplying float32 by it or by its float32 tensor rounds alike
        return scalar(scale, scale_tensor), None if norm_state is None else norm_state[1] > 0
    clip = (max_norm / (norm_state[0].sqrt() + CLIP_EPS)).clamp(max=1.0)
    return scalar(scale, scale_tensor, device) * clip, norm_state[1] > 0


def _commit(dst: torch.Tensor, new: torch.Tensor, skip) -> None:
    if skip is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(skip, dst, new))


def _advance(step: torch.Tensor, skip) -> None:
    step.add_(1.0 if skip is None else 1.0 - skip.float())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask as contiguous uint8 bits, 8 elements a byte, least significant bit first."""
    bits = (mask.reshape(-1) != 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask shaped like ``like`` that :func:`pack_mask` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[: like.numel()].view(like.shape).bool()


def _mask_at(masks, i, like=None, packed=False):
    if not len(masks):
        return None
    return unpack_mask(masks[i], like) if packed else masks[i]


def masked_sq_norm_(grads, masks, norm_state, *, alpha, packed_masks=False, alpha_tensor=None):
    r"""norm_state[0] += \sum (alpha * m * g)^2;  norm_state[1] = 1 if any element is not finite."""
    _ops.validate("masked_norm", grads, masks, norm_state, alpha=alpha, packed_masks=packed_masks,
                  alpha_tensor=alpha_tensor)
    alpha = scalar(alpha, alpha_tensor)
    for i, g in enumerate(grads):
        u = _direction(g, _mask_at(masks, i, g, packed_masks), alpha)
        norm_state[0] += (u * u).sum()
        norm_state[1] = torch.maximum(norm_state[1], (~torch.isfinite(u)).any().float())


def sgd_update_(params, grads, masks, momentum_buffers, steps, norm_state, *, lr, scale, momentum, dampening,
                weight_decay, nesterov, max_norm, packed_masks=False, lr_tensor=None, scale_tensor=None):
    r"""SGD with u = scale * c * m * g in place of the gradient (torch.optim.SGD's rule)."""
    _ops.validate("sgd_update", params, grads, masks, momentum_buffers, steps, norm_state, lr=lr, scale=scale,
                  momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                  max_norm=max_norm, packed_masks=packed_masks, lr_tensor=lr_tensor, scale_tensor=scale_tensor)
    if not params:
        return
    lr = scalar(lr, lr_tensor)
    coef, skip = clip_and_skip(norm_state, scale, max_norm, params[0].device, scale_tensor)
    for i, p in enumerate(params):
        p32 = _f32(p)
        d = _direction(grads[i], _mask_at(masks, i, p, packed_masks), coef)
        if weight_decay != 0:
            d = d + weight_decay * p32
        if momentum != 0:
            buf = momentum_buffers[i]
            # the buffer starts as d itself (torch.optim.SGD clones the first gradient)
            new_buf = torch.where(steps[i] == 0, d, momentum * _f32(buf) + (1 - dampening) * d)
            d = d + momentum * new_buf if nesterov else new_buf
            _commit(buf, new_buf, skip)
        _commit(p, p32 - lr * d, skip)
        _advance(steps[i], skip)


def adamw_update_(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, *, lr, scale, beta1, beta2, eps,
                  weight_decay, max_norm, packed_masks=False, lr_tensor=None, scale_tensor=None):
    r"""AdamW with u = scale * c * m * g in place of the gradient (torch.optim.AdamW's rule)."""
    _ops.validate("adamw_update", params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, lr=lr, scale=scale,
                  beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_norm=max_norm,
                  packed_masks=packed_masks, lr_tensor=lr_tensor, scale_tensor=scale_tensor)
    if not params:
        return
    lr = scalar(lr, lr_tensor)
    decay = decay_factor(lr, weight_decay)
    coef, skip = clip_and_skip(norm_state, scale, max_norm, params[0].device, scale_tensor)
    for i, p in enumerate(params):
        u = _direction(grads[i], _mask_at(masks, i, p, packed_masks), coef)
        t = steps[i] + 1
        m1 = beta1 * _f32(exp_avgs[i]) + (1 - beta1) * u
        m2 = beta2 * _f32(exp_avg_sqs[i]) + (1 - beta2) * u * u
        bias1 = 1 - torch.pow(beta1, t)
        bias2 = 1 - torch.pow(beta2, t)
        denom = (m2 / bias2).sqrt() + eps
        new_p = _f32(p) * decay - lr * (m1 / bias1) / denom
        _commit(exp_avgs[i], m1, skip)
        _commit(exp_avg_sqs[i], m2, skip)
        _commit(p, new_p, skip)
        _advance(steps[i], skip)


def fisher_accumulate_(fishers, grads, *, scale):
    r"""F \leftarrow F + s \cdot g^2 (F float32)."""
    _ops.validate("fisher_accumulate", fishers, grads, scale=scale)
    for f, g in zip(fishers, grads):
        g32 = _f32(g)
        f.add_(g32 * g32, alpha=scale)


def saliency_ratio(forget_fisher: torch.Tensor, remain_fisher: torch.Tensor) -> torch.Tensor:
    """(F_f + eps) / (F_r + eps) in float32, eps = 1e-15: the quantity the mask thresholds."""
    return (_f32(forget_fisher) + _ops.RATIO_EPS) / (_f32(remain_fisher) + _ops.RATIO_EPS)


def saliency_mask_(forget_fishers, remain_fishers, masks, kept, *, gamma):
    r"""m = [(F_f + eps) / (F_r + eps) >= gamma];  kept += number of ones."""
    _ops.validate("saliency_mask", forget_fishers, remain_fishers, masks, kept, gamma=gamma)
    threshold = torch.tensor(gamma, dtype=torch.float32)
    for ff, fr, m in zip(forget_fishers, remain_fishers, masks):
        keep = saliency_ratio(ff, fr) >= threshold.to(ff.device)
        m.copy_(keep)
        kept += keep.sum()


def sync_due(norm_state, counter, period: int):
    """Whether this call syncs (a 0-dim bool on the device, or ``None`` for always); advances ``counter``.

    A set non-finite flag in ``norm_state`` means no sync and no count. Otherwise the counter (remain
    steps since the last sync, below ``period``) counts the call, and reaching ``period`` means a sync
    and a restart from 0.
    """
    skip = None if norm_state is None else norm_state[1] > 0
    if counter is None:
        return None if skip is None else ~skip
    count = counter + (1.0 if skip is None else (~skip).float())
    due = count >= period  # a skipped call leaves the count below period
    counter.copy_(torch.where(due, 0.0, count))
    return due


def lerp(start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    """start + alpha (end - start) in torch.lerp's two-sided form: exact at alpha = 0 and alpha = 1."""
    diff = end - start
    return start + alpha * diff if alpha < 0.5 else end - diff * (1 - alpha)


def slow_sync_(slow_params, params, *, alpha, reset_fast, norm_state=None, counter=None, period=1):
    r"""slow \leftarrow slow + a (p - slow), exact at a = 0 and a = 1;  p \leftarrow slow if reset_fast.

    With ``counter`` or ``norm_state``, only when :func:`sync_due` says so.
    """
    _ops.validate("slow_sync", slow_params, params, alpha=alpha, reset_fast=reset_fast, norm_state=norm_state,
                  counter=counter, period=period)
    if not params:
        return
    due = sync_due(norm_state, counter, period)
    keep = None if due is None else ~due
    for s, p in zip(slow_params, params):
        _commit(s, lerp(_f32(s), _f32(p), alpha), keep)
        if reset_fast:
            _commit(p, s, keep)


# the default kernel of every op; compiled kernels override it per device
for _name in _ops.OP_NAMES.values():
    _ops.LIBRARY.impl(_name, globals()[_name], "CompositeExplicitAutograd")
