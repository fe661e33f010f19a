"""The SFR-on optimizer."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS

from . import _dtensor, _impl, _state, distributed, fisher, packing
from . import functional as F
from . import mask as _mask

PHASES = ("forget", "remain")
BASES = ("sgd", "adamw")
FISHER_KEYS = fisher.FISHER_KEYS

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
    for key in ("lr", "forget_alpha"):
        value = group[key]
        _check_number(key, float(value) if torch.is_tensor(value) else value, low=0.0)
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


def _structure(group) -> tuple:
    """The hyperparameters that decide which state a group has (a step plan depends on them)."""
    return group["base"], group["momentum"] != 0, _slow_active(group)


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
    The step itself is :func:`sfron_ops.functional.sfron`, on a plan that is worked out again
    only when the parameters, their gradients' dtypes, the masks or the state change.

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

    ``lr`` and ``forget_alpha`` may be float32 0-dim tensors on the parameters' device: the
    kernels read them where they run, so schedules that update them in place need no host
    read, a compiled step does not recompile, and a captured CUDA graph follows them.
    """

    def __init__(self, params, mask=None, lr=1e-3, base="sgd", momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, forget_alpha=1.0, max_grad_norm=None,
                 remain_max_grad_norm=None, slow_alpha=1.0, sync_period=1, reset_fast=True, check_finite=True,
                 impl=None, mask_format="dense"):
        _impl.validate_impl(impl)
        if mask_format not in packing.FORMATS:
            raise ValueError(f"Invalid mask_format: {mask_format!r}; expected one of {packing.FORMATS}")
        if not isinstance(check_finite, bool):
            raise ValueError(f"Invalid check_finite: {check_finite!r}")
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        forget_alpha=forget_alpha, max_grad_norm=max_grad_norm,
                        remain_max_grad_norm=remain_max_grad_norm, slow_alpha=slow_alpha, sync_period=sync_period,
                        reset_fast=reset_fast)
        _validate_group(defaults)
        self.impl, self.check_finite, self.mask_format = impl, check_finite, mask_format
        self._version = _state.Version()
        self._reset_runtime()
        super().__init__(params, defaults)
        # the backend of each device is chosen once (the env override too): a run cannot change it halfway
        self._impls = {}
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            self._impl_for(device)
        if mask is not None:
            self.set_masks(mask)

    def _reset_runtime(self, skipped: int = 0) -> None:
        self._phase = "remain"
        self._plan = self._plan_key = None
        self._skipped = None  # a device counter, made with the first plan
        self._skipped_base = skipped
        self._sync_counts = {}  # id(group) -> the group's sync counter on the device

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        self._version.bump()
        self._state = value if isinstance(value, _state.OptimizerState) else _state.OptimizerState(self._version,
                                                                                                    value)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group.setdefault("remain_steps", 0)
        self._version.bump()

    def __setstate__(self, state):
        state = dict(state)
        entries = state.pop("state", None)
        if "_version" not in self.__dict__:  # unpickling: the runtime fields did not travel
            self.__dict__.update(_version=_state.Version(), impl=state.pop("impl", None), check_finite=True,
                                 mask_format="dense", _impls={})
            self._reset_runtime()
        super().__setstate__(state)
        if entries is not None:
            self.state = entries
        for group in self.param_groups:
            group.setdefault("remain_steps", 0)
        self._version.bump()

    def __getstate__(self):
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups, "impl": self.impl,
                "check_finite": self.check_finite, "mask_format": self.mask_format}

    def _impl_for(self, device: torch.device) -> str:
        name = self._impls.get(device)
        if name is None:
            name = self._impls[device] = _impl.resolve_impl(self.impl, device)
        return name

    def _named_params(self):
        """[(canonical name or None, param, label for messages)] in group order."""
        out = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                name = names[pi] if names is not None else None
                label = repr(name) if name is not None else f"param_groups[{gi}]['params'][{pi}] (#{len(out)})"
                out.append((None if name is None else _mask.canonical_name(name), p, label))
        return out

    # ------------------------------------------------------------------ masks
    def set_masks(self, mask) -> None:
        """Set the saliency masks (list aligned with the parameters, or dict by name or by tensor).

        All masks are checked before any is stored; parameters the mask does not
        mention keep the mask they had (or none).
        """
        assigned = _mask.assign(self._named_params(), mask)
        if self.mask_format == "packed":
            for _, label, m in assigned:
                if m.is_floating_point():
                    raise ValueError(f"mask for parameter {label} is floating point (soft saliency); "
                                     "mask_format='packed' stores binary masks only")
        for p, _, m in assigned:
            packing.store(self.state[p], p, m, self.mask_format)

    def masks(self) -> list:
        """The masks aligned with the parameters (``None`` where a parameter has none); packed ones unpacked to bool."""
        return [packing.dense(self.state.get(p, {}), p) for _, p, _ in self._named_params()]

    # ------------------------------------------------------------------ phases
    @property
    def current_phase(self) -> str:
        return self._phase

    @current_phase.setter
    def current_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"Invalid phase: {phase!r}; expected 'forget' or 'remain'")
        self._phase = phase

    @contextmanager
    def phase(self, phase: str):
        """``with opt.phase("forget"): opt.step()``: steps inside are ``phase`` steps."""
        previous = self._phase
        self.current_phase = phase
        try:
            yield self
        finally:
            self._phase = previous

    # ------------------------------------------------------------------ step
    def step(self, closure=None, phase: str | None = None):
        """One SFR-on step of ``phase`` (default: the current phase, ``"remain"`` unless set)."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS
                or _GLOBAL_POST_HOOKS or torch.autograd.profiler._is_profiler_enabled):
            return self._observed_step(closure, phase)
        return self._step(closure, phase)

    # torch's Optimizer would wrap step() in its hook runner and profiler range on every call; that runs
    # (as _observed_step) only when a hook is registered or a profiler is on, and costs nothing otherwise
    step.hooked = True

    @torch.no_grad()
    def _step(self, closure=None, phase: str | None = None):
        phase = self._phase if phase is None else phase
        if phase not in PHASES:
            raise ValueError(f"Invalid phase: {phase!r}; expected 'forget' or 'remain'")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        capturing = self._capturing()
        plan = self._plan
        key = (self._version.value, tuple(_structure(g) for g in self.param_groups))
        if plan is not None and key != self._plan_key:
            plan = None
        grads = list(map(F.grad_of, plan.params if plan is not None else self._params()))
        if plan is None or not plan.matches(grads):
            if capturing:
                raise RuntimeError(
                    "SFRon.step() cannot be captured in a CUDA graph before one eager step with the same "
                    "parameters, gradients, masks and state: run an eager step first (it creates the state "
                    "and the step plan that a replay reuses)")
            plan = self._plan = self._make_plan(grads)
            self._plan_key = (self._version.value, key[1])  # making the plan may have created state
        if capturing:
            self._check_capturable(plan)
        F.run_step(plan, grads, self.param_groups, forget=phase == "forget", check_finite=self.check_finite,
                   skipped=self._skipped)
        return loss

    _observed_step = Optimizer.profile_hook_step(_step)

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def _make_plan(self, grads) -> F.StepPlan:
        """A plan for the flat gradient list ``grads``; creates the state it needs."""
        groups, per_group, start = [], [], 0
        for group in self.param_groups:
            group_grads = grads[start:start + len(group["params"])]
            start += len(group["params"])
            for g in group_grads:
                if g is not None and g.is_sparse:
                    raise RuntimeError("SFRon does not support sparse gradients")
            groups.append(self._group_tensors(group, [g is not None for g in group_grads]))
            per_group.append(group_grads)
        plan = F.StepPlan(groups, per_group, self._impl_for)
        if plan.devices and (self._skipped is None or self._skipped.device != plan.devices[0]):
            total = self.skipped_steps
            self._skipped = torch.zeros((), dtype=torch.float64, device=plan.devices[0])
            self._skipped_base = total
        return plan

    def _group_tensors(self, group, present) -> F.GroupTensors:
        """The group's tensors for the step; creates the state the group's structure calls for."""
        params = group["params"]
        for p, have in zip(params, present):
            state = self.state[p]
            if have and "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if "step" not in state:
                continue
            if group["base"] == "sgd" and group["momentum"] != 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["base"] == "adamw" and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if _slow_active(group) and "slow_param" not in state:
                # Note [slow snapshot]: slow weights start as the parameters at their first step
                state["slow_param"] = p.detach().clone()
        states = [self.state[p] for p in params]
        if group["base"] == "sgd":
            keys = ("momentum_buffer",) if group["momentum"] != 0 else ()
        else:
            keys = ("exp_avg", "exp_avg_sq")
        slow, counter = [], None
        if _slow_active(group) and params:
            slow = [s.get("slow_param") for s in states]
            counter = self._sync_counter(group, params[0].device)
        return F.GroupTensors(
            params=params, masks=[packing.for_kernels(s, p) for s, p in zip(states, params)],
            steps=[s.get("step") for s in states], state=[[s.get(k) for s in states] for k in keys],
            slow_params=slow, sync_counter=counter)

    def _sync_counter(self, group, device):
        """The group's remain steps since the last sync, on the device (from ``group["remain_steps"]`` at first)."""
        counter = self._sync_counts.get(id(group))
        if counter is None or counter.device != device:
            start = group["remain_steps"] if counter is None else float(counter)
            counter = self._sync_counts[id(group)] = torch.full((), float(start), dtype=torch.float32, device=device)
        return counter

    @staticmethod
    def _capturing() -> bool:
        return (not torch.compiler.is_compiling() and torch.cuda.is_initialized()
                and torch.cuda.is_current_stream_capturing())

    def _check_capturable(self, plan) -> None:
        why = None
        if len(plan.devices) != 1 or plan.devices[0].type != "cuda":
            why = f"its parameters are on {', '.join(map(str, plan.devices))}; a graph needs them on one CUDA device"
        elif plan.reduce_group is not None:
            why = "its norm is all-reduced over ranks (FSDP2)"
        else:
            for group in self.param_groups:
                for key in ("lr", "forget_alpha"):
                    value = group[key]
                    if torch.is_tensor(value) and value.device != plan.devices[0]:
                        why = (f"{key} is a tensor on {value.device}: the graph would freeze its value; put it on "
                               f"{plan.devices[0]}")
        if why is not None:
            raise RuntimeError(f"SFRon.step() cannot be captured in a CUDA graph: {why}")

    @property
    def skipped_steps(self) -> int:
        """How many steps the non-finite protection skipped (reading it synchronises)."""
        return self._skipped_base + (0 if self._skipped is None else int(self._skipped))

    # ------------------------------------------------------------------ slow weights
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
        return fisher.accumulate_into(self, which, scale, grad_scaler, impl=self._impl_for)

    def fisher(self, which: str) -> list:
        """The accumulated Fisher diagonals aligned with the parameters (``None`` where none)."""
        key = fisher.fisher_key(which)
        return [self.state[p].get(key) if p in self.state else None for _, p, _ in self._named_params()]

    @torch.no_grad()
    def compute_mask(self, gamma: float = 1.0, density: float | None = None) -> tuple[int, int]:
        """Set every parameter's mask from the accumulated Fisher; return ``(kept, total)``.

        ``m = [(F_f + eps) / (F_r + eps) >= gamma]``; with ``density`` the
        ``ceil(density * N)`` largest ratios over all parameters are kept (ties
        at the cut-off too). A parameter that never had a gradient has Fisher 0.
        """
        params = [p for _, p, _ in self._named_params()]
        forget = [fisher.stored(self.state.get(p, {}), p, "forget") for p in params]
        remain = [fisher.stored(self.state.get(p, {}), p, "remain") for p in params]
        if any(_dtensor.is_dtensor(p) for p in params):  # FSDP2: each rank computes its shards
            result = distributed.sharded_saliency_mask(params, forget, remain, gamma=gamma, density=density,
                                                       impl=self._impl_for)
        else:
            result = _mask.saliency_mask(forget, remain, gamma=gamma, density=density, impl=self._impl_for)
        for p, m in zip(params, result.masks):
            packing.store(self.state[p], p, m, self.mask_format)
        return result.kept, result.total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        for saved, group in zip(sd["param_groups"], self.param_groups):
            counter = self._sync_counts.get(id(group))
            if counter is not None:
                saved["remain_steps"] = int(counter)
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
        for _, p, label in self._named_params():  # the masks in this optimizer's format
            state = self.state.get(p, {})
            if self.mask_format == "packed" and "mask" in state:
                if state["mask"].is_floating_point():
                    raise ValueError(f"the loaded mask for parameter {label} is floating point (soft saliency); "
                                     "mask_format='packed' stores binary masks only")
                packing.store(state, p, state["mask"], "packed")
            elif self.mask_format == "dense" and "packed_mask" in state:
                packing.store(state, p, packing.dense(state, p), "dense")
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("remain_steps", 0)
        self._reset_runtime(skipped)
