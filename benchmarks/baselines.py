"""The two outside baselines, written the way their users write them.

``torch``: the best stock-PyTorch composition of the same math. Masks are kept
on the device as float tensors and applied with ``torch._foreach_mul_``,
clipping is ``clip_grad_norm_(foreach=True)``, the base step is
``torch.optim.SGD`` / ``AdamW`` with ``fused=True`` (``foreach=True`` where
torch has no fused kernel for the tensors), Fisher is
``torch._foreach_addcmul_`` and slow weights are ``torch._foreach_lerp_`` +
``torch._foreach_copy_``.

``official``: the per-parameter loop of the official SFR-on code
(``Classification/unlearn/sfron.py`` of the authors' repository, pinned to
torch 1.12, where ``torch.optim`` runs its for-loop implementation): the
saliency mask is a CPU bool tensor moved to the device every forget step and
multiplied into ``p.grad`` in place, then ``clip_grad_norm_`` (the per-tensor
loop) and ``torch.optim.SGD(foreach=False)``; Fisher is accumulated on the CPU
as ``grad.cpu() ** 2 / batches``; the mask is computed on the CPU with a
``.item()`` per tensor for the sparsity count; slow weights are the
``update_parameters`` interpolation followed by ``deepcopy`` of the model.

Both baselines receive the gradient of the loss already multiplied by
``-alpha`` in forget steps: the official code scales the loss before the
backward, which costs nothing, so the scaling is applied once when a
contender is set up, not in the timed step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import ops
from .ops import Runner

RATIO_EPS = 1e-15


def _stock_optimizer(cls, params, **kwargs):
    """``cls(params, fused=True)`` where torch supports it for these tensors, else ``foreach=True``."""
    try:
        return cls(params, fused=True, **kwargs), "fused"
    except (RuntimeError, ValueError):
        return cls(params, foreach=True, **kwargs), "foreach"


def _loss_scaled_grads(st, factor):
    """The gradients a backward of ``factor * loss`` leaves (the contender's own copies, scaled once)."""
    if factor != 1.0:
        torch._foreach_mul_(st.grads, factor)
    return st.grads


def _attach(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def _state_list(opt, params, key):
    return [opt.state[p][key] for p in params]


# ------------------------------------------------------------------ stock PyTorch


def torch_masked_norm(st):
    grads = _loss_scaled_grads(st, -ops.FORGET_ALPHA)
    float_masks = [m.to(g.dtype) for m, g in zip(st.masks, grads)]
    out = {}

    def step():
        torch._foreach_mul_(grads, float_masks)
        out["norm"] = torch.nn.utils.get_total_norm(grads, foreach=True)

    return Runner(step, lambda: [out["norm"].float().square().reshape(1)], "_foreach_mul_ + get_total_norm(foreach)")


def _torch_sgd(*, forget, clip, momentum, weight_decay):
    def build(st):
        grads = _loss_scaled_grads(st, -ops.FORGET_ALPHA if forget else 1.0)
        float_masks = [m.to(g.dtype) for m, g in zip(st.masks, grads)] if forget else None
        _attach(st.params, grads)
        opt, kind = _stock_optimizer(torch.optim.SGD, st.params, lr=ops.SGD_LR, momentum=momentum,
                                     weight_decay=weight_decay)

        def step():
            if float_masks is not None:
                torch._foreach_mul_(grads, float_masks)
            if clip:
                torch.nn.utils.clip_grad_norm_(st.params, ops.MAX_NORM, foreach=True)
            opt.step()

        def outputs():
            return list(st.params) + (_state_list(opt, st.params, "momentum_buffer") if momentum else [])

        parts = (["_foreach_mul_"] if forget else []) + (["clip_grad_norm_(foreach)"] if clip else [])
        return Runner(step, outputs, " + ".join(parts + [f"SGD({kind})"]))

    return build


def torch_adamw(st):
    grads = _loss_scaled_grads(st, -ops.ADAMW_FORGET_ALPHA)
    float_masks = [m.to(g.dtype) for m, g in zip(st.masks, grads)]
    _attach(st.params, grads)
    opt, kind = _stock_optimizer(torch.optim.AdamW, st.params, lr=ops.ADAMW_LR, betas=ops.ADAMW_BETAS,
                                 eps=ops.ADAMW_EPS, weight_decay=ops.ADAMW_WEIGHT_DECAY)

    def step():
        torch._foreach_mul_(grads, float_masks)
        torch.nn.utils.clip_grad_norm_(st.params, ops.MAX_NORM, foreach=True)
        opt.step()

    def outputs():
        return list(st.params) + _state_list(opt, st.params, "exp_avg") + _state_list(opt, st.params, "exp_avg_sq")

    return Runner(step, outputs, f"_foreach_mul_ + clip_grad_norm_(foreach) + AdamW({kind})")


def torch_fisher(st):
    def step():
        torch._foreach_addcmul_(st.fishers, st.grads, st.grads, value=1.0 / ops.FISHER_BATCHES)

    return Runner(step, lambda: list(st.fishers), "_foreach_addcmul_")


def torch_saliency(st):
    out = {}

    def step():
        ratio = torch._foreach_div(torch._foreach_add(st.forget_fishers, RATIO_EPS),
                                   torch._foreach_add(st.remain_fishers, RATIO_EPS))
        for r, m in zip(ratio, st.saliency_masks):
            torch.ge(r, ops.GAMMA, out=m)
        out["kept"] = int(torch.stack([m.sum() for m in st.saliency_masks]).sum())

    return Runner(step, lambda: list(st.saliency_masks) + [torch.tensor(out["kept"])],
                  "_foreach_add + _foreach_div + ge(out=) per tensor")


def _torch_slow_sync(alpha):
    def build(st):
        def step():
            torch._foreach_lerp_(st.slow_params, st.params, alpha)
            torch._foreach_copy_(st.params, st.slow_params)

        return Runner(step, lambda: list(st.slow_params) + list(st.params), "_foreach_lerp_ + _foreach_copy_")

    return build


TORCH = {
    "masked_norm": torch_masked_norm,
    "forget_plain": _torch_sgd(forget=True, clip=False, momentum=0.0, weight_decay=0.0),
    "forget_clip": _torch_sgd(forget=True, clip=True, momentum=0.0, weight_decay=0.0),
    "forget_full": _torch_sgd(forget=True, clip=True, momentum=ops.SGD_MOMENTUM, weight_decay=ops.SGD_WEIGHT_DECAY),
    "forget_full_packed": _torch_sgd(forget=True, clip=True, momentum=ops.SGD_MOMENTUM,
                                     weight_decay=ops.SGD_WEIGHT_DECAY),
    "remain": _torch_sgd(forget=False, clip=False, momentum=ops.SGD_MOMENTUM, weight_decay=ops.SGD_WEIGHT_DECAY),
    "adamw": torch_adamw,
    "fisher": torch_fisher,
    "saliency_mask": torch_saliency,
    "slow_sync_0.5": _torch_slow_sync(0.5),
    "slow_sync_1": _torch_slow_sync(1.0),
}


# ------------------------------------------------------------------ the official per-parameter loop


def apply_cpu_masks_(grads, cpu_masks):
    """``param.grad *= mask[name].to(param.grad.device)``, one parameter at a time."""
    for g, m in zip(grads, cpu_masks):
        g *= m.to(g.device)


@torch.no_grad()
def update_parameters(source_model: nn.Module, input_model: nn.Module, avg_fn) -> None:
    """The official interpolation: each source parameter becomes ``avg_fn(source, input)``."""
    for p_source, p_input in zip(source_model.parameters(), input_model.parameters()):
        p_source.detach().copy_(avg_fn(p_source.detach(), p_input.detach().to(p_source.device)))


def official_avg_fn(beta: float):
    """``(1 - beta) * previous + beta * current``: ``beta`` is the weight of the fast weights."""
    return lambda current, previous: (1 - beta) * previous + beta * current


class ParameterHolder(nn.Module):
    """A module whose parameters are the given tensors (shared storage), so that ``deepcopy`` copies them."""

    def __init__(self, tensors):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


def official_masked_norm(st):
    grads = _loss_scaled_grads(st, -ops.FORGET_ALPHA)
    cpu_masks = [m.cpu() for m in st.masks]
    out = {}

    def step():
        apply_cpu_masks_(grads, cpu_masks)
        out["norm"] = torch.nn.utils.get_total_norm(grads, foreach=False)

    return Runner(step, lambda: [out["norm"].float().square().reshape(1)],
                  "per-tensor CPU mask .to() + get_total_norm(for-loop)")


def _official_step(*, forget, clip, opt_cls, alpha, **opt_kwargs):
    def build(st):
        grads = _loss_scaled_grads(st, -alpha if forget else 1.0)
        cpu_masks = [m.cpu() for m in st.masks] if forget else None
        _attach(st.params, grads)
        opt = opt_cls(st.params, foreach=False, **opt_kwargs)

        def step():
            if cpu_masks is not None:
                apply_cpu_masks_(grads, cpu_masks)
            if clip:
                torch.nn.utils.clip_grad_norm_(st.params, ops.MAX_NORM, foreach=False)
            opt.step()

        def outputs():
            state0 = opt.state[st.params[0]]
            keys = [k for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if state0.get(k) is not None]
            return list(st.params) + [t for k in keys for t in _state_list(opt, st.params, k)]

        parts = (["CPU mask .to() + grad *= mask"] if forget else []) + (["clip_grad_norm_(for-loop)"] if clip else [])
        return Runner(step, outputs, " + ".join(parts + [f"{opt_cls.__name__}(foreach=False)"]))

    return build


def official_fisher(st):
    cpu_fishers = [f.cpu() for f in st.fishers]

    def step():
        for f, g in zip(cpu_fishers, st.grads):
            f += g.data.cpu() ** 2 / ops.FISHER_BATCHES

    return Runner(step, lambda: list(cpu_fishers), "F_cpu += grad.cpu() ** 2 / batches, per tensor")


def official_saliency(st):
    forget_cpu = [f.cpu() for f in st.forget_fishers]
    remain_cpu = [f.cpu() for f in st.remain_fishers]
    out = {}

    def step():
        masks, total, zeros = [], 0, 0
        for forget, remain in zip(forget_cpu, remain_cpu):
            w = (forget + RATIO_EPS) / (remain + RATIO_EPS) >= ops.GAMMA
            zeros += (w.numel() - torch.count_nonzero(w)).item()
            total += w.numel()
            masks.append(w)
        out["masks"], out["kept"] = masks, total - zeros

    return Runner(step, lambda: list(out["masks"]) + [torch.tensor(out["kept"])],
                  "CPU ratio >= gamma per tensor + count_nonzero().item()")


def _official_slow_sync(beta):
    def build(st):
        fast = ParameterHolder(st.params)
        slow = {"model": ParameterHolder(st.slow_params)}
        avg_fn = official_avg_fn(beta)

        def step():
            update_parameters(fast, slow["model"], avg_fn)
            slow["model"] = copy.deepcopy(fast)

        return Runner(step, lambda: [p.detach() for p in slow["model"].parameters()] + list(st.params),
                      "update_parameters + deepcopy(model)")

    return build


OFFICIAL = {
    "masked_norm": official_masked_norm,
    "forget_plain": _official_step(forget=True, clip=False, opt_cls=torch.optim.SGD, alpha=ops.FORGET_ALPHA,
                                   lr=ops.SGD_LR),
    "forget_clip": _official_step(forget=True, clip=True, opt_cls=torch.optim.SGD, alpha=ops.FORGET_ALPHA,
                                  lr=ops.SGD_LR),
    "forget_full": _official_step(forget=True, clip=True, opt_cls=torch.optim.SGD, alpha=ops.FORGET_ALPHA,
                                  lr=ops.SGD_LR, momentum=ops.SGD_MOMENTUM, weight_decay=ops.SGD_WEIGHT_DECAY),
    "forget_full_packed": _official_step(forget=True, clip=True, opt_cls=torch.optim.SGD, alpha=ops.FORGET_ALPHA,
                                         lr=ops.SGD_LR, momentum=ops.SGD_MOMENTUM,
                                         weight_decay=ops.SGD_WEIGHT_DECAY),
    "remain": _official_step(forget=False, clip=False, opt_cls=torch.optim.SGD, alpha=1.0, lr=ops.SGD_LR,
                             momentum=ops.SGD_MOMENTUM, weight_decay=ops.SGD_WEIGHT_DECAY),
    "adamw": _official_step(forget=True, clip=True, opt_cls=torch.optim.AdamW, alpha=ops.ADAMW_FORGET_ALPHA,
                            lr=ops.ADAMW_LR, betas=ops.ADAMW_BETAS, eps=ops.ADAMW_EPS,
                            weight_decay=ops.ADAMW_WEIGHT_DECAY),
    "fisher": official_fisher,
    "saliency_mask": official_saliency,
    "slow_sync_0.5": _official_slow_sync(0.5),
    "slow_sync_1": _official_slow_sync(1.0),
}

BASELINES = {"torch": TORCH, "official": OFFICIAL}
