"""``foreach`` kernels: the reference math composed from ``torch._foreach_*`` ops.

Same signatures and semantics as :mod:`sfron_ops.reference`. Low-precision
tensors are promoted to float32 copies first so the math matches the
reference; float32 tensors are used as they are. ``torch`` has no foreach
``where``, so on CUDA a step that must be skippable (``norm_state`` given)
commits its results with one ``torch.where`` per tensor; on the CPU the flag
is read on the host, which costs nothing there. With ``check_finite=False``
and no clipping the update is foreach from end to end.
"""

from __future__ import annotations

import torch

from . import _ops
from .reference import clip_and_skip, device_scalar, unpack_mask

_INF = float("inf")


def _f32(tensors):
    """Float32 views of a list: the tensors themselves when already float32, else promoted copies."""
    return [t if t.dtype == torch.float32 else t.to(torch.float32) for t in tensors]


def _nonempty(*lists):
    """Drop the zero-size entries (foreach reductions reject them; they cannot change anything)."""
    keep = [i for i, t in enumerate(lists[0]) if t.numel() > 0]
    return [[lst[i] for i in keep] for lst in lists]


def _unpacked(masks, like, packed):
    return [unpack_mask(m, t) for m, t in zip(masks, like)] if packed and masks else masks


def _direction(grads, masks, coef):
    """u = (g * m) * coef as new float32 tensors."""
    g32 = _f32(grads)
    if masks:
        u = torch._foreach_mul(g32, _f32(masks))
        torch._foreach_mul_(u, coef)
    else:
        u = torch._foreach_mul(g32, coef)
    return u


def _skipped_on_host(skip) -> bool:
    """On the CPU, reading the skip flag costs no synchronisation, so a skipped step can return early."""
    return skip is not None and skip.device.type == "cpu" and not torch.compiler.is_compiling() and bool(skip)


def _commit(dsts, news, skip):
    if not dsts:
        return
    if skip is not None:
        news = [torch.where(skip, d, n) for d, n in zip(dsts, news)]
    torch._foreach_copy_(dsts, news)


def _advance(steps, skip):
    if steps:
        torch._foreach_add_(steps, 1.0 if skip is None else 1.0 - skip.float())


def masked_sq_norm_(grads, masks, norm_state, *, alpha, packed_masks=False):
    _ops.validate("masked_norm", grads, masks, norm_state, alpha=alpha, packed_masks=packed_masks)
    masks = _unpacked(masks, grads, packed_masks)
    grads, masks = _nonempty(grads, masks) if masks else (_nonempty(grads)[0], [])
    if not grads:
        return
    u = _direction(grads, masks, device_scalar(alpha, grads[0].device))
    norm_state[0] += torch.stack(torch._foreach_norm(u, 2)).square().sum()
    largest = torch.stack(torch._foreach_norm(u, _INF))
    norm_state[1] = torch.maximum(norm_state[1], (~torch.isfinite(largest)).any().float())


def _add_scaled(xs, ys, coef, inplace=False):
    """xs + coef * ys; ``coef`` may be a 0-dim tensor (a tensor lr), which foreach ``alpha=`` does not take."""
    add = torch._foreach_add_ if inplace else torch._foreach_add
    if torch.is_tensor(coef):
        return add(xs, torch._foreach_mul(ys, coef))
    return add(xs, ys, alpha=coef)


def _first_step_coef(steps, dampening):
    """1 on a buffer's first step (it starts as d), else 1 - dampening; the buffer is zero before."""
    if dampening == 0:
        return None
    started = torch._foreach_clamp_max(steps, 1.0)
    torch._foreach_mul_(started, -dampening)
    torch._foreach_add_(started, 1.0)
    return started


def sgd_update_(params, grads, masks, momentum_buffers, steps, norm_state, *, lr, scale, momentum, dampening,
                weight_decay, nesterov, max_norm, packed_masks=False):
    _ops.validate("sgd_update", params, grads, masks, momentum_buffers, steps, norm_state, lr=lr, scale=scale,
                          momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                          max_norm=max_norm, packed_masks=packed_masks)
    masks = _unpacked(masks, params, packed_masks)
    if not params:
        return
    coef, skip = clip_and_skip(norm_state, scale, max_norm, params[0].device)
    if _skipped_on_host(skip):
        return
    if skip is not None and skip.device.type == "cpu" and not torch.compiler.is_compiling():
        skip = None  # the host already saw the flag clear: no per-tensor where needed
    p32 = _f32(params)
    d = _direction(grads, masks, coef)
    if weight_decay != 0:
        torch._foreach_add_(d, p32, alpha=weight_decay)
    if momentum != 0:
        new_buf = torch._foreach_mul(_f32(momentum_buffers), momentum)
        first_coef = _first_step_coef(steps, dampening)
        torch._foreach_add_(new_buf, d if first_coef is None else torch._foreach_mul(d, first_coef))
        if nesterov:
            torch._foreach_add_(d, new_buf, alpha=momentum)
        else:
            d = new_buf
        _commit(momentum_buffers, new_buf, skip)
    _commit(params, _add_scaled(p32, d, -lr), skip)
    _advance(steps, skip)


def adamw_update_(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, *, lr, scale, beta1, beta2, eps,
                  weight_decay, max_norm, packed_masks=False):
    _ops.validate("adamw_update", params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, lr=lr, scale=scale,
                            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_norm=max_norm,
                            packed_masks=packed_masks)
    masks = _unpacked(masks, params, packed_masks)
    if not params:
        return
    coef, skip = clip_and_skip(norm_state, scale, max_norm, params[0].device)
    if _skipped_on_host(skip):
        return
    if skip is not None and skip.device.type == "cpu" and not torch.compiler.is_compiling():
        skip = None  # the host already saw the flag clear: no per-tensor where needed
    u = _direction(grads, masks, coef)
    t = torch._foreach_add(steps, 1.0)
    m1 = torch._foreach_mul(_f32(exp_avgs), beta1)
    torch._foreach_add_(m1, u, alpha=1 - beta1)
    m2 = torch._foreach_mul(_f32(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(m2, u, u, value=1 - beta2)
    bias1 = torch._foreach_pow(beta1, t)
    torch._foreach_mul_(bias1, -1.0)
    torch._foreach_add_(bias1, 1.0)
    bias2 = torch._foreach_pow(beta2, t)
    torch._foreach_mul_(bias2, -1.0)
    torch._foreach_add_(bias2, 1.0)
    denom = torch._foreach_div(m2, bias2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m1, bias1)
    torch._foreach_div_(update, denom)
    new_p = torch._foreach_mul(_f32(params), 1 - lr * weight_decay)
    _add_scaled(new_p, update, -lr, inplace=True)
    _commit(exp_avgs, m1, skip)
    _commit(exp_avg_sqs, m2, skip)
    _commit(params, new_p, skip)
    _advance(steps, skip)


def fisher_accumulate_(fishers, grads, *, scale):
    _ops.validate("fisher_accumulate", fishers, grads, scale=scale)
    if fishers:
        g32 = _f32(grads)
        torch._foreach_addcmul_(fishers, g32, g32, value=scale)


def saliency_mask_(forget_fishers, remain_fishers, masks, kept, *, gamma):
    _ops.validate("saliency_mask", forget_fishers, remain_fishers, masks, kept, gamma=gamma)
    if not masks:
        return
    ratio = torch._foreach_div(torch._foreach_add(forget_fishers, _ops.RATIO_EPS),
                               torch._foreach_add(remain_fishers, _ops.RATIO_EPS))
    threshold = torch.tensor(gamma, dtype=torch.float32, device=masks[0].device)
    # no foreach comparison exists; this op runs once per unlearning run
    for r, m in zip(ratio, masks):
        keep = r >= threshold
        m.copy_(keep)
        kept += keep.sum()


def slow_sync_(slow_params, params, *, alpha, reset_fast):
    _ops.validate("slow_sync", slow_params, params, alpha=alpha, reset_fast=reset_fast)
    if not params:
        return
    s32 = _f32(slow_params)
    torch._foreach_lerp_(s32, _f32(params), alpha)  # torch's lerp is the two-sided, end-exact form
    if s32[0] is not slow_params[0]:
        torch._foreach_copy_(slow_params, s32)
    if reset_fast:
        torch._foreach_copy_(params, slow_params)


KERNELS = {
    "masked_norm": masked_sq_norm_,
    "sgd_update": sgd_update_,
    "adamw_update": adamw_update_,
    "fisher_accumulate": fisher_accumulate_,
    "saliency_mask": saliency_mask_,
    "slow_sync": slow_sync_,
}
