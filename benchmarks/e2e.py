"""End to end: the wall time of one SFR-on iteration of a CIFAR ResNet-18.

One iteration is what the official loop does at a forget iteration: a forget
step (forward and backward of the adaptive forget loss on a forget batch,
masked ascent, clip 7, SGD with momentum 0.9 and weight decay 5e-4) followed
by a remain step (cross-entropy on a remain batch, SGD) and the slow-weight
update with a = 1 (the CIFAR-10 setting). Inputs are random tensors already on
the device, so data loading is not measured.

Contenders: ``SFRon`` with each available backend; ``torch``, the same loop
from stock parts (device float masks with ``_foreach_mul_``,
``clip_grad_norm_(foreach=True)``, ``SGD(fused=True)``, and nothing for a = 1,
which is the identity); ``official``, the authors' loop (CPU masks moved per
step, for-loop clip and SGD, ``update_parameters`` + ``deepcopy``); and
``fwd_bwd``, the two forward and backward passes alone (the floor the
optimizer work sits on).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sfron_ops import AdaptiveLoss, SFRon

from . import baselines, ops
from .cases import resnet18_cifar
from .measure import peak_extra_bytes

LAMBDA = 0.5  # the adaptive-loss exponent of the CIFAR-10 setting


def official_adaptive_loss(output, target, lambd=LAMBDA):
    """The official per-sample re-weighting: weights ``N c_i / sum c``, ``c_i = 1 / (loss_i^lambda + 1e-15)``."""
    losses = nn.functional.cross_entropy(output, target, reduction="none")
    coef = 1 / (torch.pow(losses.detach().clone(), lambd) + 1e-15)
    return ((coef / coef.sum()) * losses * output.shape[0]).mean()


def _inputs(device, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(batch, 3, 32, 32, generator=g).to(device),  # noqa: E731
                    torch.randint(0, 10, (batch,), generator=g).to(device))
    return make(), make()


def _model_and_masks(device, seed=0):
    torch.manual_seed(seed)
    model = resnet18_cifar(device="cpu").to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    masks = {name: (torch.rand(p.shape, generator=g) < 0.5).to(device) for name, p in model.named_parameters()}
    return model, masks


def _ours(impl):
    def build(device, batch):
        model, masks = _model_and_masks(device)
        (xf, yf), (xr, yr) = _inputs(device, batch)
        opt = SFRon(model.named_parameters(), mask=masks, lr=ops.SGD_LR, momentum=ops.SGD_MOMENTUM,
                    weight_decay=ops.SGD_WEIGHT_DECAY, forget_alpha=ops.FORGET_ALPHA, max_grad_norm=ops.MAX_NORM,
                    slow_alpha=1.0, impl=impl)
        forget_loss = AdaptiveLoss(lambd=LAMBDA)
        remain_loss = nn.CrossEntropyLoss()

        def iteration():
            opt.zero_grad()
            forget_loss(model(xf), yf).backward()
            opt.step(phase="forget")
            opt.zero_grad()
            remain_loss(model(xr), yr).backward()
            opt.step()

        return iteration

    return build


def _torch(device, batch):
    model, masks = _model_and_masks(device)
    (xf, yf), (xr, yr) = _inputs(device, batch)
    params = list(model.parameters())
    float_masks = [masks[name].float() for name, _ in model.named_parameters()]
    opt, _ = baselines._stock_optimizer(torch.optim.SGD, params, lr=ops.SGD_LR, momentum=ops.SGD_MOMENTUM,
                                        weight_decay=ops.SGD_WEIGHT_DECAY)
    remain_loss = nn.CrossEntropyLoss()

    def iteration():
        opt.zero_grad()
        (-ops.FORGET_ALPHA * official_adaptive_loss(model(xf), yf)).backward()
        with torch.no_grad():
            torch._foreach_mul_([p.grad for p in params], float_masks)
        torch.nn.utils.clip_grad_norm_(params, ops.MAX_NORM, foreach=True)
        opt.step()
        opt.zero_grad()
        remain_loss(model(xr), yr).backward()
        opt.step()

    return iteration


def _official(device, batch):
    model, masks = _model_and_masks(device)
    (xf, yf), (xr, yr) = _inputs(device, batch)
    cpu_masks = {name: m.cpu() for name, m in masks.items()}
    opt = torch.optim.SGD(model.parameters(), ops.SGD_LR, momentum=ops.SGD_MOMENTUM,
                          weight_decay=ops.SGD_WEIGHT_DECAY, foreach=False)
    remain_loss = nn.CrossEntropyLoss()
    avg_fn = baselines.official_avg_fn(1.0)
    slow = {"model": copy.deepcopy(model)}

    def iteration():
        opt.zero_grad(set_to_none=False)  # torch 1.12 zeroed gradients in place
        (ops.FORGET_ALPHA * -official_adaptive_loss(model(xf), yf)).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad *= cpu_masks[name].to(p.grad.device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=ops.MAX_NORM, foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=False)
        remain_loss(model(xr), yr).backward()
        opt.step()
        baselines.update_parameters(model, slow["model"], avg_fn)
        slow["model"] = copy.deepcopy(model)

    return iteration


def _fwd_bwd(device, batch):
    model, _ = _model_and_masks(device)
    (xf, yf), (xr, yr) = _inputs(device, batch)
    remain_loss = nn.CrossEntropyLoss()

    def iteration():
        model.zero_grad()
        official_adaptive_loss(model(xf), yf).backward()
        model.zero_grad()
        remain_loss(model(xr), yr).backward()

    return iteration


def builders(ours_impls) -> dict:
    out = {impl: _ours(impl) for impl in ours_impls}
    out.update(torch=_torch, official=_official, fwd_bwd=_fwd_bwd)
    return out


def run(device, batch, ours_impls, timer, names=None, log=print, memory=True) -> list[dict]:
    """One row per contender: the iteration time, its spread and the peak memory of one iteration.

    The peak includes the activations of the forward passes, the same for every
    contender; the difference to ``fwd_bwd`` is what the optimizer side adds.
    """
    rows = []
    for name, build in builders(ours_impls).items():
        if names and name not in names:
            continue
        iteration = build(device, batch)
        timing = timer(iteration)
        peak = peak_extra_bytes(iteration, device) if memory else None
        kind = "ours" if name in ours_impls else ("floor" if name == "fwd_bwd" else "baseline")
        rows.append({"contender": name, "kind": kind, "batch": batch, **timing, "memory": peak})
        log(f"  e2e {name:>10}: {timing['median_s'] * 1e3:9.2f} ms  ({timing['reps']} reps)")
        del iteration
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows
