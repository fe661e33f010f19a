"""List-level SFR-on operations: bucket tensors, pick each bucket's kernels, call them.

A bucket holds the tensors that one kernel launch can take: same device, same
dtype, same mask dtype (or no mask). Each function here takes plain lists,
with ``None`` where a parameter has no mask, and an ``impl`` resolved per
device by :mod:`sfron_ops._impl`; :class:`sfron_ops.SFRon` calls them once
per parameter group.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from . import _impl


def is_packed(mask, like) -> bool:
    """Whether ``mask`` is bit-packed for ``like``: flat uint8 of ``ceil(numel / 8)`` bytes, not ``like``'s shape.

    (A dense uint8 mask has ``like``'s shape; where the two could coincide, one
    element or none, both read the same.)
    """
    return mask.dtype == torch.uint8 and mask.shape != like.shape


def buckets(tensors, masks=None):
    """``{(device, dtype, mask dtype, "packed" or None): [indices]}`` in first-seen order."""
    out = defaultdict(list)
    for i, t in enumerate(tensors):
        m = masks[i] if masks is not None else None
        out[(t.device, t.dtype, None if m is None else ("packed" if is_packed(m, t) else m.dtype))].append(i)
    return out


def _local(t):
    # a DTensor (FSDP2) runs its kernels on the local shard, which shares its storage under no_grad
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def _pick(lst, idx):
    return [_local(lst[i]) for i in idx]


def kernels_for(impl, device):
    """The kernel table for ``device``; ``impl`` is a backend name, ``None``, or a callable ``device -> name``."""
    name = impl(device) if callable(impl) else _impl.resolve_impl(impl, device)
    return _impl.kernels(name)


def new_norm_states(devices) -> dict:
    """One zeroed ``[sum of squares, non-finite flag]`` float32 buffer per device."""
    return {d: torch.zeros(2, dtype=torch.float32, device=d) for d in devices}


def reduce_norm_states(norm_states: dict) -> None:
    """Make every device's buffer hold the totals over all devices (no-op for one device)."""
    if len(norm_states) < 2:
        return
    states = list(norm_states.values())
    home = states[0].device
    stacked = torch.stack([s.to(home) for s in states])
    total = torch.stack([stacked[:, 0].sum(), stacked[:, 1].max()])
    for s in states:
        s.copy_(total)


def masked_sq_norm_(grads, masks, norm_states, *, alpha, impl=None):
    """Add ``sum((alpha * m * g)^2)`` and the non-finite flag into ``norm_states[device]``."""
    for (device, _, mask_dtype), idx in buckets(grads, masks).items():
        k = kernels_for(impl, device)["masked_norm"]
        k(_pick(grads, idx), _pick(masks, idx) if mask_dtype is not None else [], norm_states[device], alpha=alpha,
          packed_masks=mask_dtype == "packed")


def sgd_update_(params, grads, masks, momentum_buffers, steps, norm_states, *, lr, scale, momentum, dampening,
                weight_decay, nesterov, max_norm, impl=None):
    for (device, _, mask_dtype), idx in buckets(params, masks).items():
        k = kernels_for(impl, device)["sgd_update"]
        k(_pick(params, idx), _pick(grads, idx), _pick(masks, idx) if mask_dtype is not None else [],
          _pick(momentum_buffers, idx) if momentum != 0 else [], _pick(steps, idx),
          None if norm_states is None else norm_states[device],
          lr=lr, scale=scale, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
          nesterov=nesterov, max_norm=max_norm, packed_masks=mask_dtype == "packed")


def adamw_update_(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_states, *, lr, scale, beta1, beta2, eps,
                  weight_decay, max_norm, impl=None):
    for (device, _, mask_dtype), idx in buckets(params, masks).items():
        k = kernels_for(impl, device)["adamw_update"]
        k(_pick(params, idx), _pick(grads, idx), _pick(masks, idx) if mask_dtype is not None else [],
          _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx), _pick(steps, idx),
          None if norm_states is None else norm_states[device],
          lr=lr, scale=scale, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_norm=max_norm,
          packed_masks=mask_dtype == "packed")


def fisher_accumulate_(fishers, grads, *, scale, impl=None):
    """``F += scale * g^2`` for aligned lists of float32 accumulators and gradients."""
    for (device, _, _), idx in buckets(grads).items():
        kernels_for(impl, device)["fisher_accumulate"](_pick(fishers, idx), _pick(grads, idx), scale=scale)


def saliency_mask_(forget_fishers, remain_fishers, masks, *, gamma, impl=None) -> int:
    """Fill ``masks`` with ``ratio >= gamma``; return how many elements were kept."""
    kept = []
    for (device, _, _), idx in buckets(forget_fishers).items():
        count = torch.zeros((), dtype=torch.int64, device=device)
        kernels_for(impl, device)["saliency_mask"](
            _pick(forget_fishers, idx), _pick(remain_fishers, idx), _pick(masks, idx), count, gamma=gamma)
        kept.append(count)
    return int(sum(int(c) for c in kept))


def slow_sync_(slow_params, params, *, alpha, reset_fast, impl=None):
    for (device, _, _), idx in buckets(params).items():
        kernels_for(impl, device)["slow_sync"](_pick(slow_params, idx), _pick(params, idx), alpha=alpha,
                                               reset_fast=reset_fast)
