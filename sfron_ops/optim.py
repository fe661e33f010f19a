"""The SFR-on optimizer."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.optim import Optimizer

from . import _impl
from . import distributed as _dist
from . import functional as F
from . import packing as _packing
from .mask import canonical_name

PHASES = ("forget", "remain")
BASES = ("sgd", "adamw")
FISHER_KEYS = {"forget": "fisher_forget", "remain": "fisher_remain"}

# State entries the torch loader must not cast to the parameter's dtype:
# Fisher accumulators stay float32, masks keep the dtype they were given (packed ones uint8).
_KEEP_DTYPE = ("mask", "packed_mask", "fisher_forget", "fisher_remain")


def _check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        raise ValueError(f"Invalid {name}: {value!r}")


def _validate_group(group: dict) -> None:
    """Raise ValueError naming the first bad hyperparameter of a param group."""
    if group["base"] not in BASES:
        raise ValueError(f"Invalid base: {group['base']!r}; expected one of {BASES}")
    _check_number("lr", float(group["lr"]) if torch.is_tensor(group["lr"]) else group["lr"], low=0.0)
    alpha = group["forget_alpha"]
    _check_number("forget_alpha", float(alpha) if torch.is_tensor(alpha) else alpha, low=0.0)
    _check_number("momentum", group["momentum"], low=0.0)
    _check_number("dampening", group["dampening"], low=0.0, high=1.0)
    _check_number("weight_decay", group["weight_decay"], low=0.0)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov: True needs momentum > 0 and dampening = 0 (got momentum={group['momentum']!r}, "
            f"dampening={group['dampening']!r})")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}")
    _check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    _check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    _check_number("eps", group["eps"], low=0.0)
    for key in ("max_grad_norm", "remain_max_grad_norm"):
        if group[key] is not None:
            _check_number(key, group[key], low=0.0, low_open=True)
    _check_number("slow_alpha", group["slow_alpha"], low=0.0, high=1.0)
    period = group["sync_period"]
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"Invalid sync_period: {period!r}")
    if not isinstance(group["reset_fast"], bool):
        raise ValueError(f"Invalid reset_fast: {group['reset_fast']!r}")


def _slow_active(group) -> bool:
    # a = 1 with a reset is the identity: no slow copy at all (the official CIFAR-10 setting)
    return not (group["slow_alpha"] == 1.0 and group["reset_fast"])


class SFRon(Optimizer):
    r"""SFR-on: saliency-masked, sample-weighted gradient ascent with fast and slow weights.

    Both phases go through :meth:`step`: ``opt.step()`` is a remain step,
    ``opt.step(phase="forget")`` (or ``with opt.phase("forget"): opt.step()``) a
    forget step. The two phases share one base-optimizer state, as the official
    code shares one ``torch.optim`` optimizer.

    .. math::
       \begin{aligned}
       &\textbf{forget step} \text{ (gradient } g \text{ of the adaptive forget loss, mask } m\text{)}\\
       &\quad u \leftarrow -\alpha \, m \odot g \\
       &\quad \textbf{if } \text{max\_grad\_norm}: \;
            u \leftarrow \min\!\big(1, \tfrac{\text{max\_grad\_norm}}{\lVert u\rVert_2 + 10^{-6}}\big)\, u
            \quad (\lVert u \rVert_2 \text{ over every group})\\
       &\textbf{remain step} \text{ (gradient } g \text{ of the remain loss)}\\
       &\quad u \leftarrow g, \text{ clipped by remain\_max\_grad\_norm if set}\\
       &\textbf{base update with } u \text{ in place of the gradient}\\
       &\quad \text{SGD: } d \leftarrow u + \lambda_w \theta;\;
            b \leftarrow d \text{ (first step) else } \mu b + (1-\tau) d;\;
            d \leftarrow d + \mu b \text{ if nesterov else } b;\; \theta \leftarrow \theta - \eta d\\
       &\quad \text{AdamW: } \theta \leftarrow \theta (1 - \eta\lambda_w);\;
            m_1 \leftarrow \beta_1 m_1 + (1-\beta_1) u;\; m_2 \leftarrow \beta_2 m_2 + (1-\beta_2) u^2;\\
       &\quad\qquad \theta \leftarrow \theta - \eta \,
            \frac{m_1 / (1-\beta_1^t)}{\sqrt{m_2 / (1-\beta_2^t)} + \epsilon}\\
       &\textbf{after every } k\text{-th remain step (slow weights } \phi\text{)}\\
       &\quad \phi \leftarrow \phi + a(\theta - \phi);\quad \theta \leftarrow \phi \text{ if reset\_fast}\\
       &\textbf{if } u \text{ holds a NaN or an infinity: the step changes nothing and skipped\_steps grows}
       \end{aligned}

    The mask comes from the Fisher ratio
    :math:`m = [(F_f + \varepsilon)/(F_r + \varepsilon) \ge \gamma]`
    (:meth:`accumulate_fisher`, :meth:`compute_mask`, or :func:`sfron_ops.saliency_mask`).
    The per-sample weighting of the forget loss lives in :class:`sfron_ops.AdaptiveLoss`.

    Args:
        params: tensors, param-group dicts, or ``model.named_parameters()``.
        mask: ``None``, a list aligned with the parameters, or a dict keyed by
            parameter name (``module.``/``_orig_mod.``/``_fsdp_wrapped_module.``
            prefixes are ignored) or by the parameter tensor. Bool, uint8 or
            floating point (soft saliency); applied to forget gradients only.
        lr, momentum, dampening, nesterov, weight_decay: SGD's (``base="sgd"``).
        betas, eps: AdamW's (``base="adamw"``); ``lr`` and ``weight_decay`` too.
        forget_alpha: the ascent scale α; a param-group key, so it can follow a schedule.
        max_grad_norm: clip of the forget direction over all groups (``None``: off).
        remain_max_grad_norm: the same for remain steps.
        slow_alpha, sync_period, reset_fast: slow weights; ``slow_alpha=1`` with
            ``reset_fast=True`` (the default) turns them off at no cost.
        check_finite: skip steps whose direction is not finite, with no host
            synchronisation (``skipped_steps`` counts them).
        impl: ``None`` (fastest available per device, or ``$SFRON_OPS_IMPL``),
            ``"reference"``, ``"foreach"``, ``"fused"`` or ``"triton"``.
        mask_format: ``"dense"`` keeps masks as given; ``"packed"`` stores binary
            masks with one bit per weight (8x less than bool) and the kernels read
            the bits directly (:mod:`sfron_ops.packing`).
    """

    def __init__(self, params, mask=None, lr=1e-3, base="sgd", momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, forget_alpha=1.0, max_grad_norm=None,
                 remain_max_grad_norm=None, slow_alpha=1.0, sync_period=1, reset_fast=True, check_finite=True,
                 impl=None, mask_format="dense"):
        _impl.validate_impl(impl)
        if mask_format not in _packing.FORMATS:
            raise ValueError(f"Invalid mask_format: {mask_format!r}; expected one of {_packing.FORMATS}")
        self.mask_format = mask_format
        if not isinstance(check_finite, bool):
            raise ValueError(f"Invalid check_finite: {check_finite!r}")
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        forget_alpha=forget_alpha, max_grad_norm=max_grad_norm,
                        remain_max_grad_norm=remain_max_grad_norm, slow_alpha=slow_alpha, sync_period=sync_period,
                        reset_fast=reset_fast)
        _validate_group(defaults)
        self.impl = impl
        self.check_finite = check_finite
        self._phase = "remain"
        self._norm_buffers = {}
        self._skip_counter = None
        self._skip_offset = 0
        super().__init__(params, defaults)
        # the env override is read once, so a run cannot change backend halfway
        self._impls = {}
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            self._impl_for(device)
        if mask is not None:
            self.set_masks(mask)

    # ------------------------------------------------------------------ groups and masks
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group.setdefault("remain_steps", 0)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("impl", None)
        self.__dict__.setdefault("check_finite", True)
        self.__dict__.setdefault("_phase", "remain")
        self.__dict__.setdefault("_norm_buffers", {})
        self.__dict__.setdefault("_skip_counter", None)
        self.__dict__.setdefault("_skip_offset", 0)
        self.__dict__.setdefault("_impls", {})
        self.__dict__.setdefault("mask_format", "dense")
        for group in self.param_groups:
            group.setdefault("remain_steps", 0)

    def _impl_for(self, device: torch.device) -> str:
        name = self._impls.get(device)
        if name is None:
            name = self._impls[device] = _impl.resolve_impl(self.impl, device)
        return name

    def _named_params(self):
        """[(canonical name or None, param, label for messages)] in group order."""
        out = []
        index = 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                name = names[pi] if names is not None else None
                label = repr(name) if name is not None else f"param_groups[{gi}]['params'][{pi}] (#{index})"
                out.append((None if name is None else canonical_name(name), p, label))
                index += 1
        return out

    def set_masks(self, mask) -> None:
        """Set the saliency masks (list aligned with the parameters, or dict by name or by tensor).

        All masks are checked before any is stored; parameters the mask does not
        mention keep the mask they had (or none).
        """
        named = self._named_params()
        assigned = []
        if isinstance(mask, (list, tuple)):
            if len(mask) != len(named):
                raise ValueError(f"mask is a list of {len(mask)} entries but the optimizer has {len(named)} parameters")
            assigned = [(p, label, m) for (_, p, label), m in zip(named, mask) if m is not None]
        elif isinstance(mask, dict):
            by_name = {n: (p, label) for n, p, label in named if n is not None}
            by_tensor = {p: label for _, p, label in named}
            for key, m in mask.items():
                if isinstance(key, str):
                    if not by_name:
                        raise ValueError(
                            f"mask is keyed by name ({key!r}) but the parameters have no names; "
                            "pass model.named_parameters()")
                    hit = by_name.get(canonical_name(key))
                    if hit is None:
                        raise ValueError(f"mask for {key!r} names no parameter of this optimizer")
                    assigned.append((hit[0], hit[1], m))
                elif torch.is_tensor(key):
                    if key not in by_tensor:
                        raise ValueError(f"mask is keyed by a tensor of shape {tuple(key.shape)} that is not "
                                         "a parameter of this optimizer")
                    assigned.append((key, by_tensor[key], m))
                else:
                    raise TypeError(f"mask keys must be parameter names or tensors, got {type(key).__name__}")
        else:
            raise TypeError(f"mask must be None, a list or a dict, got {type(mask).__name__}")
        checked = [(p, self._checked_mask(p, label, m)) for p, label, m in assigned]
        if self.mask_format == "packed":
            for _, label, m in assigned:
                if m.is_floating_point():
                    raise ValueError(f"mask for parameter {label} is floating point (soft saliency); "
                                     "mask_format='packed' stores binary masks only")
        for p, m in checked:
            self._store_mask(p, m)

    @staticmethod
    def _checked_mask(p, label, m):
        if not torch.is_tensor(m):
            raise TypeError(f"mask for parameter {label} must be a tensor, got {type(m).__name__}")
        if not (m.dtype in (torch.bool, torch.uint8) or m.is_floating_point()):
            raise ValueError(f"mask for parameter {label} has dtype {m.dtype}; expected bool, uint8 or floating point")
        if m.shape != p.shape:
            raise ValueError(f"mask for parameter {label} has shape {tuple(m.shape)}, expected {tuple(p.shape)}")
        if m.device != p.device:
            if m.device.type == "meta":
                raise ValueError(f"mask for parameter {label} is on the meta device (no data); "
                                 f"the parameter is on {p.device}")
            m = m.to(p.device)  # a copy on the parameter's device; the caller's tensor is untouched
        return _dist.shard_like(m, p)  # placed like a DTensor (FSDP2) parameter

    def masks(self) -> list:
        """The masks aligned with the parameters (``None`` where a parameter has none); packed ones unpacked to bool."""
        out = []
        for _, p, _ in self._named_params():
            state = self.state.get(p, {})
            packed = state.get("packed_mask")
            out.append(state.get("mask") if packed is None else _packing.unpack_like(packed, p))
        return out

    def _store_mask(self, p, m) -> None:
        # a parameter holds one of "mask" (as given) or "packed_mask" (one bit per element)
        state = self.state[p]
        state.pop("mask", None)
        state.pop("packed_mask", None)
        if self.mask_format == "packed":
            state["packed_mask"] = _packing.pack_like(m, p)
        else:
            state["mask"] = m

    @staticmethod
    def _kernel_mask(p, state):
        packed = state.get("packed_mask")
        return state.get("mask") if packed is None else _packing.kernel_view(packed, p)

    def _convert_masks(self) -> None:
        """Bring loaded masks to this optimizer's ``mask_format``."""
        for _, p, label in self._named_params():
            state = self.state.get(p, {})
            if self.mask_format == "packed" and "mask" in state:
                if state["mask"].is_floating_point():
                    raise ValueError(f"the loaded mask for parameter {label} is floating point (soft saliency); "
                                     "mask_format='packed' stores binary masks only")
                self._store_mask(p, state["mask"])
            elif self.mask_format == "dense" and "packed_mask" in state:
                self._store_mask(p, _packing.unpack_like(state["packed_mask"], p))

    # ------------------------------------------------------------------ phases
    @property
    def current_phase(self) -> str:
        return self._phase

    @staticmethod
    def _check_phase(phase):
        if phase not in PHASES:
            raise ValueError(f"Invalid phase: {phase!r}; expected 'forget' or 'remain'")

    @contextmanager
    def phase(self, phase: str):
        """``with opt.phase("forget"): opt.step()``: steps inside are ``phase`` steps."""
        self._check_phase(phase)
        previous, self._phase = self._phase, phase
        try:
            yield self
        finally:
            self._phase = previous

    # ------------------------------------------------------------------ step
    def _gather(self, group):
        """Lists of the params with a gradient, their grads, masks and state; state is created lazily."""
        params, grads, masks, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SFRon does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                self._init_state(group, p, state)
            params.append(p)
            grads.append(p.grad)
            masks.append(self._kernel_mask(p, state))
            steps.append(state["step"])
        return params, grads, masks, steps

    @staticmethod
    def _init_state(group, p, state):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if group["base"] == "sgd":
            if group["momentum"] != 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if _slow_active(group):
            # Note [slow snapshot]: slow weights start as the parameters at their first step
            state["slow_param"] = p.detach().clone()

    def _norm_states(self, devices):
        for d in devices:
            buf = self._norm_buffers.get(d)
            if buf is None:
                buf = self._norm_buffers[d] = torch.zeros(2, dtype=torch.float32, device=d)
            else:
                buf.zero_()
        return {d: self._norm_buffers[d] for d in devices}

    @torch.no_grad()
    def step(self, closure=None, phase: str | None = None):
        """One SFR-on step of ``phase`` (default: the current phase, ``"remain"`` unless set)."""
        phase = self._phase if phase is None else phase
        self._check_phase(phase)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        forget = phase == "forget"
        clip_key = "max_grad_norm" if forget else "remain_max_grad_norm"
        gathered = [self._gather(group) for group in self.param_groups]
        devices = list(dict.fromkeys(p.device for params, *_ in gathered for p in params))

        norm_states = None
        if devices and (self.check_finite or any(g[clip_key] is not None for g in self.param_groups)):
            norm_states = self._norm_states(devices)
            # FSDP2: each rank adds its shards once and the norm state is summed over the ranks
            reduce_group = _dist.norm_reduce_group([grads for _, grads, _, _ in gathered])
            for group, (_, grads, masks, _) in zip(self.param_groups, gathered):
                masks = masks if forget else [None] * len(grads)
                if reduce_group is not None:
                    grads, masks = _dist.norm_share(grads, masks, reduce_group)
                F.masked_sq_norm_(grads, masks, norm_states,
                                  alpha=self._scalar(group["forget_alpha"], grads) if forget else 1.0,
                                  impl=self._impl_for)
            F.reduce_norm_states(norm_states)
            if reduce_group is not None:
                _dist.all_reduce_norm_states(norm_states, reduce_group)
            if self.check_finite:
                self._count_skip(norm_states[devices[0]])
            else:
                for s in norm_states.values():
                    s[1].zero_()

        for group, (params, grads, masks, steps) in zip(self.param_groups, gathered):
            if not params:
                continue
            self._update(group, params, grads, masks if forget else [None] * len(params), steps, norm_states,
                         scale=-self._scalar(group["forget_alpha"], params) if forget else 1.0,
                         max_norm=group[clip_key] or 0.0)

        if not forget:
            for group in self.param_groups:
                if _slow_active(group):
                    # remain steps since the last sync, kept below sync_period: a compiled step then sees
                    # at most sync_period values of it, so a long run does not recompile
                    group["remain_steps"] = (group["remain_steps"] + 1) % group["sync_period"]
                    if group["remain_steps"] == 0:
                        self._sync_slow(group)
        return loss

    def _scalar(self, value, tensors):
        """``lr`` or ``forget_alpha`` for the kernels: tensors stay tensors on the Python backends.

        A compiled step (or a captured CUDA graph) then reads their current value,
        so a schedule that updates them in place causes no recompilation; the
        compiled ops' schemas take floats.
        """
        if torch.is_tensor(value) and tensors and self._impl_for(tensors[0].device) not in ("reference", "foreach"):
            return float(value)
        return value

    def _update(self, group, params, grads, masks, steps, norm_states, *, scale, max_norm):
        lr = self._scalar(group["lr"], params)
        impl = self._impl_for
        if group["base"] == "sgd":
            if group["momentum"] != 0:
                for p in params:  # momentum switched on mid-run
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params] if group["momentum"] != 0 else []
            F.sgd_update_(params, grads, masks, bufs, steps, norm_states, lr=lr, scale=scale,
                          momentum=group["momentum"], dampening=group["dampening"],
                          weight_decay=group["weight_decay"], nesterov=group["nesterov"], max_norm=max_norm,
                          impl=impl)
        else:
            beta1, beta2 = group["betas"]
            F.adamw_update_(params, grads, masks, [self.state[p]["exp_avg"] for p in params],
                            [self.state[p]["exp_avg_sq"] for p in params], steps, norm_states, lr=lr, scale=scale,
                            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                            max_norm=max_norm, impl=impl)

    def _count_skip(self, norm_state):
        if self._skip_counter is None or self._skip_counter.device != norm_state.device:
            previous = 0 if self._skip_counter is None else int(self._skip_counter)
            self._skip_counter = torch.full((), previous, dtype=torch.int64, device=norm_state.device)
        self._skip_counter += (norm_state[1] > 0).to(torch.int64)

    @property
    def skipped_steps(self) -> int:
        """How many steps the non-finite protection skipped (reading it synchronises)."""
        return self._skip_offset + (0 if self._skip_counter is None else int(self._skip_counter))

    # ------------------------------------------------------------------ slow weights
    def _sync_slow(self, group):
        slow, fast = [], []
        for p in group["params"]:
            state = self.state.get(p)
            if state and "slow_param" in state:
                slow.append(state["slow_param"])
                fast.append(p)
            elif state and "step" in state:  # slow weights switched on mid-run
                state["slow_param"] = p.detach().clone()
        if fast:
            F.slow_sync_(slow, fast, alpha=group["slow_alpha"], reset_fast=group["reset_fast"],
                         impl=self._impl_for)

    def slow_weights(self) -> list:
        """The slow weights aligned with the parameters (the parameters themselves where there are none)."""
        out = []
        for _, p, _ in self._named_params():
            state = self.state.get(p)
            out.append(state["slow_param"] if state and "slow_param" in state else p.detach())
        return out

    @contextmanager
    def use_slow_weights(self):
        """Swap the slow weights into the parameters (for evaluation) and back afterwards."""
        pairs = [(p, self.state[p]["slow_param"]) for _, p, _ in self._named_params()
                 if p in self.state and "slow_param" in self.state[p]]
        backups = []
        with torch.no_grad():
            for p, s in pairs:
                backups.append(p.detach().clone())
                p.copy_(s)
        try:
            yield self
        finally:
            with torch.no_grad():
                for (p, _), b in zip(pairs, backups):
                    p.copy_(b)

    # ------------------------------------------------------------------ saliency
    def accumulate_fisher(self, which: str, scale: float = 1.0, grad_scaler=None) -> bool:
        """``F_which += scale * grad^2`` (float32) for every parameter with a gradient; call after a backward.

        Squares of scaled gradients would carry the scale squared: with a
        ``torch.amp.GradScaler`` pass it as ``grad_scaler`` and the gradients are
        unscaled first, and a batch whose gradients overflowed is left out (call
        ``grad_scaler.update()`` after each batch). Returns whether the batch was added.
        """
        if which not in FISHER_KEYS:
            raise ValueError(f"Invalid which: {which!r}; expected 'forget' or 'remain'")
        _check_number("scale", scale, low=0.0)
        if grad_scaler is not None:
            from .integrations.amp import unscale_for_fisher  # local: integrations imports this module

            if not unscale_for_fisher(grad_scaler, self):
                return False
        key = FISHER_KEYS[which]
        fishers, grads = [], []
        for p in (p for g in self.param_groups for p in g["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            fishers.append(state[key])
            grads.append(p.grad)
        with torch.no_grad():
            F.fisher_accumulate_(fishers, grads, scale=scale, impl=self._impl_for)
        return True

    def fisher(self, which: str) -> list:
        """The accumulated Fisher diagonals aligned with the parameters (``None`` where none)."""
        if which not in FISHER_KEYS:
            raise ValueError(f"Invalid which: {which!r}; expected 'forget' or 'remain'")
        return [self.state[p].get(FISHER_KEYS[which]) if p in self.state else None
                for _, p, _ in self._named_params()]

    @torch.no_grad()
    def compute_mask(self, gamma: float = 1.0, density: float | None = None) -> tuple[int, int]:
        """Set every parameter's mask from the accumulated Fisher; return ``(kept, total)``.

        ``m = [(F_f + eps) / (F_r + eps) >= gamma]``; with ``density`` the
        ``ceil(density * N)`` largest ratios over all parameters are kept (ties
        at the cut-off too). A parameter that never had a gradient has Fisher 0.
        """
        from .mask import saliency_mask  # local: mask.py imports nothing from here

        params = [p for _, p, _ in self._named_params()]
        forget = [self._fisher_or_zero(p, "forget") for p in params]
        remain = [self._fisher_or_zero(p, "remain") for p in params]
        if any(_dist.is_dtensor(p) for p in params):  # FSDP2: each rank computes its shards
            result = _dist.sharded_saliency_mask(params, forget, remain, gamma=gamma, density=density,
                                                 impl=self._impl_for)
        else:
            result = saliency_mask(forget, remain, gamma=gamma, density=density, impl=self._impl_for)
        for p, m in zip(params, result.masks):
            self._store_mask(p, m)
        return result.kept, result.total

    def _fisher_or_zero(self, p, which):
        f = self.state[p].get(FISHER_KEYS[which]) if p in self.state else None
        return f if f is not None else torch.zeros_like(p, dtype=torch.float32)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        # torch casts floating state to the parameter's dtype and leaves "step" where it was
        # saved; put these back as they were saved, on the parameter's device
        restore = {}
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {})
            restore[p] = {k: v for k, v in saved.items() if k in _KEEP_DTYPE or k == "step"}
        super().load_state_dict(state_dict)
        for p, entries in restore.items():
            for k, v in entries.items():
                dtype = torch.float32 if k == "step" else v.dtype
                self.state[p][k] = v.to(device=p.device, dtype=dtype, copy=True)
        self._convert_masks()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("remain_steps", 0)
        self._skip_counter = None
        self._skip_offset = skipped
