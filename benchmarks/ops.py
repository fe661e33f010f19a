"""The measured operations: the math, the byte model, and how our backends run them.

Our backends are driven through :mod:`sfron_ops.functional` with the backend
given as a callable ``device -> name``, exactly as :class:`sfron_ops.SFRon`
calls it: the update ops through :func:`~sfron_ops.functional.sfron` on a step
plan made once, so every backend pays the same per-step host work.

Hyperparameters are the official CIFAR-10 configuration (SGD lr 0.01, momentum
0.9, weight decay 5e-4, forget alpha 25, clip 7) and, for AdamW, the
TinyImageNet one (lr 2e-5, weight decay 0.05, forget alpha 500, clip 7).

Byte model (``performance.md`` section 4): DRAM bytes per parameter of the
minimal single-pass kernels, with ``P`` the parameter element size (4 for
fp32, 2 for bf16), a 1-byte mask and float32 Fisher accumulators. The same
count is used for every contender, so GB/s is an effective rate ("how fast the
necessary work got done"), not each contender's own traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sfron_ops import functional as F

SGD_LR = 0.01
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
FORGET_ALPHA = 25.0
MAX_NORM = 7.0
ADAMW_LR = 2e-5
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 0.05
ADAMW_FORGET_ALPHA = 500.0
FISHER_BATCHES = 100  # Fisher scale s = 1 / batches, as the official loader average
GAMMA = 1.0


@dataclass
class Runner:
    """A prepared contender: ``step()`` runs one call, ``outputs()`` lists what it computed."""

    step: Callable[[], object]
    outputs: Callable[[], list]
    note: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str
    family: str  # the kernel family stem (benchmarks/bench_<family>.py)
    title: str
    needs: tuple
    bytes_formula: str
    bytes_per_param: Callable[[int], float]
    ours: Callable
    dtypes: tuple = ("fp32", "bf16")
    notes: str = field(default="")
    # of bytes_per_param, those moved by passes that only read, and by copy-like passes (read one
    # array, write another); the rest is read-modify-write (measure.stream_bound_s)
    read_bytes_per_param: Callable[[int], float] = lambda p: 0
    copy_bytes_per_param: Callable[[int], float] = lambda p: 0

    def modelled_bytes(self, numel: int, dtype: torch.dtype) -> float:
        return self.bytes_per_param(dtype.itemsize) * numel

    def read_bytes(self, numel: int, dtype: torch.dtype) -> float:
        return self.read_bytes_per_param(dtype.itemsize) * numel

    def copy_bytes(self, numel: int, dtype: torch.dtype) -> float:
        return self.copy_bytes_per_param(dtype.itemsize) * numel


def backend(name: str):
    """The backend picker the optimizer passes to the functional layer: ``device -> name``."""
    return lambda device: name


def _norm_states(st):
    return {st.norm_state.device: st.norm_state}


# ------------------------------------------------------------------ our side


def _ours_masked_norm(st, impl):
    norm_states = _norm_states(st)

    def step():
        st.norm_state.zero_()
        F.masked_sq_norm_(st.grads, st.masks, norm_states, alpha=FORGET_ALPHA, impl=impl)

    return Runner(step, lambda: [st.norm_state[:1]])


def _hyper(**kw) -> list[dict]:
    """The param-group keys :func:`sfron_ops.functional.sfron` reads, for one group."""
    return [dict(dict(base="sgd", lr=SGD_LR, forget_alpha=FORGET_ALPHA, momentum=0.0, dampening=0.0, nesterov=False,
                      weight_decay=0.0, betas=ADAMW_BETAS, eps=ADAMW_EPS, max_grad_norm=None,
                      remain_max_grad_norm=None, slow_alpha=1.0, sync_period=1, reset_fast=True), **kw)]


def _step(st, impl, *, forget: bool, check_finite: bool, masks, state, hyper):
    """One step of :func:`sfron_ops.functional.sfron` on a plan made once, as SFRon makes it."""
    group = F.GroupTensors(params=st.params, masks=masks, steps=st.steps, state=state)
    plan = F.StepPlan([group], [st.grads], impl)
    return lambda: F.run_step(plan, st.grads, hyper, forget=forget, check_finite=check_finite, skipped=None)


def _ours_sgd(*, forget: bool, clip: bool, momentum: float, weight_decay: float, check_finite: bool,
              packed: bool = False):
    def build(st, impl):
        n = len(st.params)
        masks = (st.packed_masks if packed else st.masks) if forget else [None] * n
        bufs = st.momentum_buffers if momentum else []
        clip_key = "max_grad_norm" if forget else "remain_max_grad_norm"
        hyper = _hyper(momentum=momentum, weight_decay=weight_decay, **{clip_key: MAX_NORM if clip else None})
        step = _step(st, impl, forget=forget, check_finite=check_finite, masks=masks,
                     state=[bufs] if momentum else [], hyper=hyper)
        return Runner(step, lambda: list(st.params) + list(bufs))

    return build


def _ours_adamw(st, impl):
    hyper = _hyper(base="adamw", lr=ADAMW_LR, forget_alpha=ADAMW_FORGET_ALPHA, weight_decay=ADAMW_WEIGHT_DECAY,
                   max_grad_norm=MAX_NORM)
    step = _step(st, impl, forget=True, check_finite=True, masks=st.masks, state=[st.exp_avgs, st.exp_avg_sqs],
                 hyper=hyper)
    return Runner(step, lambda: list(st.params) + list(st.exp_avgs) + list(st.exp_avg_sqs))


def _ours_fisher(st, impl):
    def step():
        F.fisher_accumulate_(st.fishers, st.grads, scale=1.0 / FISHER_BATCHES, impl=impl)

    return Runner(step, lambda: list(st.fishers))


def _ours_saliency(st, impl):
    kept = {}

    def step():
        kept["n"] = F.saliency_mask_(st.forget_fishers, st.remain_fishers, st.saliency_masks, gamma=GAMMA, impl=impl)

    return Runner(step, lambda: list(st.saliency_masks) + [torch.tensor(kept["n"])])


def _ours_slow_sync(alpha):
    def build(st, impl):
        def step():
            F.slow_sync_(st.slow_params, st.params, alpha=alpha, reset_fast=True, impl=impl)

        return Runner(step, lambda: list(st.slow_params) + list(st.params))

    return build


# ------------------------------------------------------------------ the table

_SGD_NEEDS = ("params", "grads", "masks")

OPS = {
    spec.name: spec
    for spec in (
        OpSpec("masked_norm", "masked_norm", "squared norm of the masked forget direction and the non-finite flag",
               ("grads", "masks"), "P + 1", lambda p: p + 1, _ours_masked_norm, read_bytes_per_param=lambda p: p + 1),
        OpSpec("forget_plain", "sgd_update", "forget step, plain: p -= lr * (-alpha * m * g)",
               _SGD_NEEDS, "3P + 1", lambda p: 3 * p + 1,
               _ours_sgd(forget=True, clip=False, momentum=0.0, weight_decay=0.0, check_finite=False),
               notes="no clip, no momentum, non-finite check off: one pass"),
        OpSpec("forget_clip", "sgd_update", "forget step with the global-norm clip (max 7)",
               _SGD_NEEDS, "4P + 2", lambda p: 4 * p + 2,
               _ours_sgd(forget=True, clip=True, momentum=0.0, weight_decay=0.0, check_finite=True),
               notes="norm pass, then the update", read_bytes_per_param=lambda p: p + 1),
        OpSpec("forget_full", "sgd_update", "forget step: clip + momentum 0.9 + weight decay 5e-4 (official CIFAR)",
               _SGD_NEEDS + ("momentum_buffers",), "6P + 2", lambda p: 6 * p + 2,
               _ours_sgd(forget=True, clip=True, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY,
                         check_finite=True), read_bytes_per_param=lambda p: p + 1),
        OpSpec("forget_full_packed", "sgd_update", "forget_full with bit-packed masks (one bit per weight)",
               _SGD_NEEDS + ("momentum_buffers", "packed_masks"), "6P + 2/8", lambda p: 6 * p + 0.25,
               _ours_sgd(forget=True, clip=True, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY,
                         check_finite=True, packed=True), read_bytes_per_param=lambda p: p + 0.125,
               notes="our backends read the packed masks (SFRon(mask_format='packed')); the baselines have no "
                     "packed form and use their dense masks, as in forget_full"),
        OpSpec("remain", "sgd_update", "remain step: SGD momentum 0.9 + weight decay 5e-4, no mask",
               ("params", "grads", "momentum_buffers"), "6P", lambda p: 6 * p,
               _ours_sgd(forget=False, clip=False, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY,
                         check_finite=True),
               notes="ours includes SFRon's default non-finite check (a P-byte read pass); the baselines have none",
               read_bytes_per_param=lambda p: p),
        OpSpec("adamw", "adamw_update", "AdamW forget step: mask + clip 7, lr 2e-5, weight decay 0.05, alpha 500",
               ("params", "grads", "masks", "exp_avgs", "exp_avg_sqs"), "8P + 2", lambda p: 8 * p + 2, _ours_adamw,
               read_bytes_per_param=lambda p: p + 1),
        OpSpec("fisher", "fisher_accumulate", "Fisher accumulation F += g^2 / batches (F float32)",
               ("grads", "fishers"), "P + 8", lambda p: p + 8, _ours_fisher),
        OpSpec("saliency_mask", "saliency_mask", "saliency mask (F_f + eps) / (F_r + eps) >= gamma, with the count",
               ("forget_fishers", "remain_fishers", "saliency_masks"), "9", lambda p: 9, _ours_saliency,
               dtypes=("fp32",), notes="Fisher is float32 whatever the parameters are: one dtype; the pass writes "
               "one byte for every eight it reads, so its reads count at the read-only stream and its write at the "
               "copy stream", read_bytes_per_param=lambda p: 8, copy_bytes_per_param=lambda p: 1),
        OpSpec("slow_sync_0.5", "slow_sync", "slow sync a = 0.5: slow += a (p - slow); p = slow",
               ("params", "slow_params"), "4P", lambda p: 4 * p, _ours_slow_sync(0.5)),
        OpSpec("slow_sync_1", "slow_sync", "slow sync a = 1 (official CIFAR setting): slow = p",
               ("params", "slow_params"), "2P", lambda p: 2 * p, _ours_slow_sync(1.0),
               notes="a direct kernel call; SFRon itself skips a = 1 syncs entirely (zero cost)",
               copy_bytes_per_param=lambda p: 2 * p),
    )
}
