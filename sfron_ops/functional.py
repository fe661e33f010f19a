r"""The functional SFR-on step, and the list-level ops that it and the helpers call.

:func:`sfron` is to :class:`sfron_ops.SFRon` what ``torch.optim.sgd.sgd`` is to
``torch.optim.SGD``: it takes the parameter groups' tensors and hyperparameters
and does a whole step, norm and non-finite check, clip, base update, step
counters and slow-weight sync, with no Python loop over tensors beyond picking
up the gradients.

What depends only on the structure of a step (which tensors, on which devices,
in which dtypes, with which masks and state, on which backend) is worked out
once into a :class:`StepPlan` and reused: buckets (the tensors one kernel call
takes: same device, dtype and mask kind), each bucket's kernels, the norm
buffers, the distributed reduction, and the argument checks. A step then reads
the gradients and the hyperparameters and calls one kernel per bucket and pass.

Tensor hyperparameters (``lr``, ``forget_alpha``: float32 0-dim tensors on the
parameters' device) go to the kernels as tensors, which read them where they
run, so a schedule that updates them in place needs no host read: the step can
be compiled without recompilation and captured in a CUDA graph.

The list-level ops below (``masked_sq_norm_``, ``fisher_accumulate_``, ...)
bucket their arguments on every call; the Fisher and mask helpers use them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

import torch

from . import _dtensor, _groups, _impl, _ops

#: backends whose kernels check their arguments on every call themselves (in C++, or by signature)
SELF_CHECKING = ("fused", "triton")

def is_packed(mask, like) -> bool:
    """Whether ``mask`` is bit-packed for ``like``: flat uint8 of ``ceil(numel / 8)`` bytes, not ``like``'s shape.

    (A dense uint8 mask has ``like``'s shape; where the two could coincide, one
    element or none, both read the same.)
    """
    return mask.dtype == torch.uint8 and mask.shape != like.shape


# --------------------------------------------------------------------------- the step
class GroupTensors(NamedTuple):
    """One parameter group's tensors for :func:`sfron`, aligned with ``params``.

    ``masks`` holds ``None`` where a parameter has no mask; ``state`` the base
    optimizer's lists (``[momentum_buffers]`` for SGD with momentum, ``[]``
    without, ``[exp_avgs, exp_avg_sqs]`` for AdamW); ``slow_params`` is empty
    when slow weights are off, and ``sync_counter`` (a float32 0-dim tensor on
    the group's first device: remain steps since the last sync) goes with it.
    """

    params: list
    masks: list
    steps: list
    state: list
    slow_params: list = ()
    sync_counter: torch.Tensor | None = None


class _Bucket(NamedTuple):
    """The tensors of one group that one kernel call takes."""

    index: list  # positions in the flat gradient list of the step
    device: torch.device
    norm: object  # the backend's kernels
    sgd: object
    adamw: object
    params: list
    masks: list  # as the kernels take them; [] for none
    packed: bool
    steps: list
    state: list
    local: bool  # DTensors: the kernels run on the local shards
    whole: bool = False  # the bucket takes the step's whole gradient list, in order


def _missing(grads) -> tuple:
    """The positions of the parameters without a gradient."""
    return tuple(i for i, g in enumerate(grads) if g is None)


def _signature(grads) -> tuple:
    # what a gradient may change between steps without a new plan noticing otherwise: torch keeps a gradient in
    # its parameter's shape and on its device, but lets its dtype and layout change
    return tuple(None if g is None else (g.dtype, g.layout) for g in grads)


# the same in C++, as bytes, for eager steps (traced code runs the Python one, which the compiler folds away)
_eager_signature = _impl.grad_signature() or _signature


def _kernel_scalar(value, device):
    """``(number, tensor or None)`` for an op's scalar and its ``*_tensor`` argument.

    A tensor hyperparameter on the bucket's device is passed as it is; one elsewhere (a CPU tensor
    for CUDA parameters, say) is read on the host, which a CUDA graph would freeze.
    """
    if not torch.is_tensor(value):
        return value, None
    if value.device == device and value.dtype == torch.float32 and value.dim() == 0:
        return 1.0, value
    if value.device.type == "cpu":
        return float(value), None
    return 1.0, value.to(device=device, dtype=torch.float32).reshape(())


class StepPlan:
    """Everything about a step that does not change from one step to the next (see the module notes).

    Built from the groups' tensors, one step's gradients (per group, aligned with its params; which
    parameters have one, in which shape and dtype: later steps must match, see :meth:`matches`) and
    a backend choice (``impl``: a name, ``None``, or a callable ``device -> name``). Building runs
    every kernel's argument checks on the plan's lists, so the steps that reuse it skip the Python
    backends' checks (the fused and Triton kernels check on every call anyway).
    """

    def __init__(self, groups: list[GroupTensors], grads: list[list], impl=None, labels: list | None = None):
        self.groups = groups
        self.params = [p for g in groups for p in g.params]
        self.labels = labels or [f"#{i}" for i in range(len(self.params))]
        flat = [x for gs in grads for x in gs]
        if len(flat) != len(self.params):
            raise ValueError(f"{len(flat)} gradients for {len(self.params)} parameters")
        for i, g in enumerate(flat):
            if g is not None and g.layout != torch.strided:
                raise ValueError(f"the gradient of parameter {self.labels[i]} is {g.layout} (sparse gradients are "
                                 "not supported)")
        self.missing = _missing(flat)
        self.signature = _signature(flat)
        # a plan made while tracing has no eager signature (Dynamo cannot trace the C++ one): the first eager
        # step on it makes a new one
        self.eager_signature = None if torch.compiler.is_compiling() else _eager_signature(flat)
        names = {}

        def kernels(device):
            if device not in names:
                names[device] = _impl.resolve_for(impl, device)
            return _impl.kernels(names[device])

        self.devices = []
        self.forget_buckets, self.remain_buckets, self.slow_buckets = [], [], []
        start = 0
        for g in groups:
            idx = [i for i in range(len(g.params)) if flat[start + i] is not None]
            self.forget_buckets.append(self._buckets(g, idx, start, kernels, with_masks=True))
            self.remain_buckets.append(self._buckets(g, idx, start, kernels, with_masks=False))
            self.slow_buckets.append(self._slow_buckets(g, kernels))
            for i in idx:
                if g.params[i].device not in self.devices:
                    self.devices.append(g.params[i].device)
            start += len(g.params)
        for buckets in (self.forget_buckets, self.remain_buckets):
            for group_buckets in buckets:
                group_buckets[:] = [b._replace(whole=b.index == list(range(len(flat)))) for b in group_buckets]
        self.self_checking = all(name in SELF_CHECKING for name in names.values())
        self.norm_states = {d: torch.zeros(2, dtype=torch.float32, device=d) for d in self.devices}
        self.flag = self.norm_states[self.devices[0]][1] if self.devices else None
        # FSDP2: each rank adds its shards' squares once and the norm state is summed over the ranks
        any_dtensor = any(_dtensor.is_dtensor(p) for p in self.params)
        self.reduce_group = _dtensor.norm_reduce_group([self.params]) if any_dtensor else None
        # which tensors this rank adds to the summed norm (each element once over the ranks)
        self.counts = None
        if self.reduce_group is not None:
            self.counts = [_dtensor.counts_here(p, self.reduce_group) for p in self.params]
        if not torch.compiler.is_compiling():  # while tracing, the ops' fake kernels run the same checks
            self._check(flat)

    def matches(self, grads) -> bool:
        """Whether a step's flat gradient list fits this plan: the same ones present, in the same dtypes and
        layouts (the plan's checks covered those, so a step on it checks nothing before it writes)."""
        if torch.compiler.is_compiling():
            return _signature(grads) == self.signature
        return _eager_signature(grads) == self.eager_signature

    def capture_problem(self, hyper) -> str | None:
        """Why a step on this plan cannot be captured in a CUDA graph, or ``None``."""
        if len(self.devices) != 1 or self.devices[0].type != "cuda":
            return (f"its parameters are on {', '.join(map(str, self.devices)) or 'no device'}; a graph needs them "
                    "on one CUDA device")
        if self.reduce_group is not None:
            return "its norm is all-reduced over ranks (FSDP2)"
        for gi, h in enumerate(hyper):
            for key in ("lr", "forget_alpha"):
                value = h[key]
                if torch.is_tensor(value) and value.device != self.devices[0]:
                    return (f"param_groups[{gi}]['{key}'] is a tensor on {value.device}: the graph would freeze its "
                            f"value; put it on {self.devices[0]}")
        return None

    @staticmethod
    def _buckets(g: GroupTensors, idx, start, kernels, with_masks: bool) -> list[_Bucket]:
        by_key = defaultdict(list)
        for i in idx:
            p, m = g.params[i], g.masks[i] if with_masks else None
            kind = None if m is None else ("packed" if is_packed(m, p) else m.dtype)
            by_key[(p.device, p.dtype, kind)].append(i)
        out = []
        for (device, _, kind), where in by_key.items():
            table = kernels(device)
            out.append(_Bucket(
                index=[start + i for i in where], device=device, norm=table["masked_norm"],
                sgd=table["sgd_update"], adamw=table["adamw_update"], params=[g.params[i] for i in where],
                masks=[] if kind is None else [g.masks[i] for i in where], packed=kind == "packed",
                steps=[g.steps[i] for i in where], state=[[lst[i] for i in where] for lst in g.state],
                local=any(_dtensor.is_dtensor(g.params[i]) for i in where)))
        return out

    @staticmethod
    def _slow_buckets(g: GroupTensors, kernels) -> list:
        if not g.slow_params:
            return []
        # one call per device: the kernel advances the group's sync counter once per call
        by_device = defaultdict(list)
        for i, p in enumerate(g.params):
            if g.slow_params[i] is not None:
                by_device[p.device].append(i)
        return [(device, kernels(device)["slow_sync"], [g.slow_params[i] for i in where],
                 [g.params[i] for i in where], any(_dtensor.is_dtensor(g.params[i]) for i in where))
                for device, where in by_device.items()]

    def _check(self, grads) -> None:
        """Every call a step on this plan makes, checked once with these gradients; an error names the parameter."""
        for b in (b for buckets in self.forget_buckets + self.remain_buckets for b in buckets):
            grad, params, masks, state = _gather(b, grads)
            ns = self.norm_states[b.device]
            try:
                _ops.check_masked_sq_norm(grad, masks, ns, alpha=1.0, packed_masks=b.packed)
                if len(state) == 2:
                    _ops.check_adamw_update(params, grad, masks, state[0], state[1], b.steps, ns, lr=1.0, scale=1.0,
                                            beta1=0.9, beta2=0.9, eps=0.0, weight_decay=0.0, max_norm=0.0,
                                            packed_masks=b.packed)
                else:
                    _ops.check_sgd_update(params, grad, masks, state[0] if state else [], b.steps, ns, lr=1.0,
                                          scale=1.0, momentum=1.0 if state else 0.0, dampening=0.0,
                                          weight_decay=0.0, nesterov=False, max_norm=0.0, packed_masks=b.packed)
            except RuntimeError as error:
                raise type(error)(self._named(str(error), b.index)) from None
        for device, _, slow, params, local in (s for buckets in self.slow_buckets for s in buckets):
            if local:
                slow, params = [_dtensor.to_local(t) for t in slow], [_dtensor.to_local(t) for t in params]
            _ops.check_slow_sync(slow, params, alpha=0.5, reset_fast=True, norm_state=self.norm_states[device])

    def _named(self, message: str, index: list) -> str:
        """A kernel check's message, with the position in a kernel call that it names given as the parameter."""
        match = re.search(r"\b(\w+)\[(\d+)\]", message)
        if match is None or int(match.group(2)) >= len(index):
            return message
        return f"{message} (the {match.group(1)} entry of parameter {self.labels[index[int(match.group(2))]]})"


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never while compiling: the graph is made later)."""
    return (not torch.compiler.is_compiling() and torch.cuda.is_initialized()
            and torch.cuda.is_current_stream_capturing())


class PlanCache:
    """An optimizer's last :class:`StepPlan`, reused while its parameters, gradients, masks and state fit it.

    ``get(groups, version, make)`` returns the plan and the flat gradient list of a step on the param groups
    ``groups``. A plan is made again (``make(grads)``) when ``version.value`` (the state's version, which making a
    plan may advance as it creates state) or a group's structure changed, or the gradients no longer match; never
    while a CUDA graph is being captured, where a plan that does not fit is an error, as is one whose step cannot
    be captured.
    """

    def __init__(self):
        self._plan = self._key = None

    def get(self, groups, version, make) -> tuple[StepPlan, list]:
        structure = tuple(map(_groups.structure, groups))
        plan = self._plan if self._key == (version.value, structure) else None
        params = plan.params if plan is not None else [p for group in groups for p in group["params"]]
        grads = [p.grad for p in params]
        in_capture = capturing()
        if plan is None or not plan.matches(grads):
            if in_capture:
                raise RuntimeError(
                    "SFRon.step() cannot be captured in a CUDA graph before one eager step with the same "
                    "parameters, gradients, masks and state: run an eager step first (it creates the state "
                    "and the step plan that a replay reuses)")
            plan = self._plan = make(grads)
            self._key = (version.value, structure)
        if in_capture:
            problem = plan.capture_problem(groups)
            if problem is not None:
                raise RuntimeError(f"SFRon.step() cannot be captured in a CUDA graph: {problem}")
        return plan, grads


@torch.no_grad()
def sfron(groups: list[GroupTensors], grads: list[list], hyper: list, *, phase: str = "remain",
          check_finite: bool = True, skipped: torch.Tensor | None = None, plan: StepPlan | None = None,
          impl=None) -> StepPlan:
    r"""One SFR-on step over parameter groups; returns the plan it used (pass it again to reuse it).

    .. math::
       \begin{aligned}
       &u \leftarrow -\alpha\, m \odot g \text{ (forget) or } g \text{ (remain)};\quad
        u \leftarrow \min\!\big(1, \tfrac{c}{\lVert u\rVert_2 + 10^{-6}}\big) u \text{ if a clip } c \text{ is set}\\
       &\text{base update (SGD or AdamW) with } u \text{ in place of the gradient; step counters} + 1\\
       &\text{remain: every } k\text{-th step } \phi \leftarrow \phi + a(\theta - \phi),\
        \theta \leftarrow \phi \text{ if reset\_fast}\\
       &\text{a non-finite } u \text{ (with check\_finite) skips all of it, and } \texttt{skipped} \mathrel{+}= 1
       \end{aligned}

    Args:
        groups: each group's tensors (:class:`GroupTensors`).
        grads: each group's gradients, aligned with its params (``None``: that parameter is left alone).
        hyper: each group's hyperparameters, a mapping with SFRon's param-group keys.
        phase: ``"forget"`` or ``"remain"``.
        check_finite: skip the step when ``u`` holds a NaN or an infinity (no host synchronisation).
        skipped: a 0-dim float64 tensor on the first device that counts skipped steps.
        plan: a :class:`StepPlan` of these ``groups`` (made here if not given, or if these gradients
            do not fit it).
        impl: the backend, when a plan is made here.
    """
    flat = [x for gs in grads for x in gs]
    if plan is None or not plan.matches(flat):
        plan = StepPlan(groups, grads, impl)
    run_step(plan, flat, hyper, forget=phase == "forget", check_finite=check_finite, skipped=skipped)
    return plan


def _gather(bucket: _Bucket, grads):
    picked = grads if bucket.whole else [grads[i] for i in bucket.index]
    if bucket.local:
        local = _dtensor.to_local
        return ([local(t) for t in picked], [local(t) for t in bucket.params], [local(t) for t in bucket.masks],
                [[local(t) for t in s] for s in bucket.state])
    return picked, bucket.params, bucket.masks, bucket.state


def run_step(plan: StepPlan, grads: list, hyper: list, *, forget: bool, check_finite: bool,
             skipped: torch.Tensor | None, loss: torch.Tensor | None = None) -> None:
    """The step of :func:`sfron` on a plan that :meth:`~StepPlan.matches` the flat gradient list ``grads``.

    ``loss`` (what a closure returned): with ``check_finite``, a non-finite loss skips the step too.
    """
    if not plan.devices:
        return
    if plan.self_checking or torch.compiler.is_compiling():
        _run(plan, grads, hyper, forget, check_finite, skipped, loss)
    else:
        with _ops.step_scope():
            _run(plan, grads, hyper, forget, check_finite, skipped, loss)


def _run(plan, grads, hyper, forget, check_finite, skipped, loss):
    clip_key = "max_grad_norm" if forget else "remain_max_grad_norm"
    buckets = plan.forget_buckets if forget else plan.remain_buckets
    keys = ("lr", "forget_alpha") if forget else ("lr",)
    # tensor hyperparameters a schedule fills on the device: a bad value skips the step (see _groups)
    guarded = [h[k] for h in hyper for k in keys if torch.is_tensor(h[k])]
    if check_finite and loss is not None:
        guarded.append(loss)
    measure = check_finite or any(h[clip_key] is not None for h in hyper)
    norm_states = plan.norm_states if measure or guarded else None
    if norm_states is not None:
        for s in norm_states.values():
            s.zero_()
    if measure:
        for group_buckets, h in zip(buckets, hyper):
            for b in group_buckets:
                g, _, masks, _ = _gather(b, grads)
                if plan.counts is not None:  # under FSDP2 some tensors count on another rank
                    keep = [plan.counts[i] for i in b.index]
                    g = [t for t, k in zip(g, keep) if k]
                    masks = [m for m, k in zip(masks, keep) if k] if masks else []
                alpha, alpha_tensor = _kernel_scalar(h["forget_alpha"], b.device) if forget else (1.0, None)
                b.norm(g, masks, norm_states[b.device], alpha=alpha, packed_masks=b.packed, alpha_tensor=alpha_tensor)
        if len(norm_states) > 1:
            reduce_norm_states(norm_states)
        if plan.reduce_group is not None:
            _dtensor.all_reduce_norm_states(norm_states, plan.reduce_group)
        if not check_finite:
            for s in norm_states.values():
                s[1].zero_()
    for value in guarded:
        ok = torch.isfinite(value) if value is loss else torch.isfinite(value) & (value >= 0)
        bad = torch.logical_not(ok.all()).to(torch.float32)
        for s in norm_states.values():
            torch.maximum(s[1], bad.to(s.device), out=s[1])
    if skipped is not None and (check_finite or guarded):
        skipped.add_(plan.flag)

    for group_buckets, h in zip(buckets, hyper):
        max_norm = h[clip_key] or 0.0
        for b in group_buckets:
            g, params, masks, state = _gather(b, grads)
            lr, lr_tensor = _kernel_scalar(h["lr"], b.device)
            if forget:
                scale, scale_tensor = _kernel_scalar(h["forget_alpha"], b.device)
                scale = -scale
            else:
                scale, scale_tensor = 1.0, None
            ns = None if norm_states is None else norm_states[b.device]
            if h["base"] == "sgd":
                b.sgd(params, g, masks, state[0] if state else [], b.steps, ns, lr=lr, scale=scale,
                      momentum=h["momentum"], dampening=h["dampening"], weight_decay=h["weight_decay"],
                      nesterov=h["nesterov"], max_norm=max_norm, packed_masks=b.packed, lr_tensor=lr_tensor,
                      scale_tensor=scale_tensor)
            else:
                beta1, beta2 = h["betas"]
                b.adamw(params, g, masks, state[0], state[1], b.steps, ns, lr=lr, scale=scale, beta1=beta1,
                        beta2=beta2, eps=h["eps"], weight_decay=h["weight_decay"], max_norm=max_norm,
                        packed_masks=b.packed, lr_tensor=lr_tensor, scale_tensor=scale_tensor)

    if not forget:
        for group, slow_buckets, h in zip(plan.groups, plan.slow_buckets, hyper):
            home = group.sync_counter
            for device, kernel, slow, params, local in slow_buckets:
                if local:
                    slow, params = [_dtensor.to_local(t) for t in slow], [_dtensor.to_local(t) for t in params]
                # another device advances a copy: every call decides from the count before the step
                counter = home if home is None or home.device == device else home.to(device)
                kernel(slow, params, alpha=h["slow_alpha"], reset_fast=h["reset_fast"],
                       norm_state=None if norm_states is None else norm_states[device], counter=counter,
                       period=h["sync_period"])


# --------------------------------------------------------------------------- list-level ops
def buckets(tensors, masks=None):
    """``{(device, dtype, mask kind or None): [indices]}`` in first-seen order."""
    out = defaultdict(list)
    for i, t in enumerate(tensors):
        m = masks[i] if masks is not None else None
        out[(t.device, t.dtype, None if m is None else ("packed" if is_packed(m, t) else m.dtype))].append(i)
    return out


def _pick(lst, idx):
    return [_dtensor.to_local(lst[i]) for i in idx]


def kernels_for(impl, device):
    """The kernel table for ``device``; ``impl`` is a backend name, ``None``, or a callable ``device -> name``."""
    return _impl.kernels(_impl.resolve_for(impl, device))


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
    for (device, _, mask_kind), idx in buckets(grads, masks).items():
        value, tensor = _kernel_scalar(alpha, device)
        kernels_for(impl, device)["masked_norm"](
            _pick(grads, idx), _pick(masks, idx) if mask_kind is not None else [], norm_states[device],
            alpha=value, packed_masks=mask_kind == "packed", alpha_tensor=tensor)


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
    """``slow += alpha * (p - slow)``, then ``p = slow`` if ``reset_fast``, for aligned lists."""
    for (device, _, _), idx in buckets(params).items():
        kernels_for(impl, device)["slow_sync"](_pick(slow_params, idx), _pick(params, idx), alpha=alpha,
                                               reset_fast=reset_fast)
