"""The SFR-on optimizer."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS

from . import _checkpoint, _groups, _impl, _state, fisher, packing
from . import functional as F
from . import mask as _mask

PHASES = _groups.PHASES
BASES = _groups.BASES
FISHER_KEYS = fisher.FISHER_KEYS


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
    only when the parameters, their gradients' shapes and dtypes, the masks or the state change.
    Every hyperparameter, mask and state entry is checked before anything is written: a bad one
    raises an error that names it, and the model and the optimizer stay as they were.

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
    read, a compiled step does not recompile, and a captured CUDA graph follows them (a tensor
    filled with a negative or non-finite value makes the step a skipped one).
    """

    def __init__(self, params, mask=None, lr=1e-3, base="sgd", momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, forget_alpha=1.0, max_grad_norm=None,
                 remain_max_grad_norm=None, slow_alpha=1.0, sync_period=1, reset_fast=True, check_finite=True,
                 impl=None, mask_format="dense"):
        _groups.check_options(mask_format, check_finite, packing.FORMATS)
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        forget_alpha=forget_alpha, max_grad_norm=max_grad_norm,
                        remain_max_grad_norm=remain_max_grad_norm, slow_alpha=slow_alpha, sync_period=sync_period,
                        reset_fast=reset_fast)
        _groups.check_group(defaults)
        self.impl, self.check_finite, self.mask_format = impl, check_finite, mask_format
        self._version = _state.Version()
        self._reset_runtime()
        super().__init__(params, defaults)
        self._impl_for = _impl.PerDevice(impl, {p.device for p in self._params()})
        if mask is not None:
            self.set_masks(mask)

    def _reset_runtime(self, skipped: int = 0) -> None:
        self._phase = "remain"
        self._plans, self._checked, self._skipped = F.PlanCache(), _groups.Checked(), _state.Skipped(skipped)
        self._sync_counts = {}  # id(group) -> the group's remain steps since the last sync, on the device

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        self._version.bump()
        self._state = value if isinstance(value, _state.OptimizerState) else _state.OptimizerState(self._version,
                                                                                                    value)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, refusing duplicate parameters and bad hyperparameters (the group is then not added)."""
        super().add_param_group(_groups.unique_params(param_group))
        group, where = self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]"
        group.setdefault("remain_steps", 0)
        try:
            _groups.check_group(group, where)
            _groups.check_params(group, where)
        except ValueError:
            self.param_groups.pop()
            raise
        self._version.bump()

    def __setstate__(self, state):
        state = dict(state)
        entries = state.pop("state", None)
        if "_version" not in self.__dict__:  # unpickling: the runtime fields did not travel
            self.__dict__.update(_version=_state.Version(), impl=state.pop("impl", None),
                                 check_finite=state.pop("check_finite", True),
                                 mask_format=state.pop("mask_format", "dense"))
            self._impl_for = _impl.PerDevice(self.impl)
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

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ masks
    def set_masks(self, mask) -> None:
        """Set the saliency masks (list aligned with the parameters, or dict by name or by tensor).

        All masks are checked before any is stored (binary, or floating point with finite values);
        parameters the mask does not mention keep the mask they had (or none).
        """
        packing.store_all(self.state, _mask.assign(_mask.named_params(self.param_groups), mask), self.mask_format)

    def masks(self) -> list:
        """The masks aligned with the parameters (``None`` where a parameter has none); packed ones unpacked to bool."""
        return [packing.dense(self.state.get(p, {}), p) for p in self._params()]

    # ------------------------------------------------------------------ phases
    @property
    def current_phase(self) -> str:
        return self._phase

    @current_phase.setter
    def current_phase(self, phase: str) -> None:
        _groups.check_phase(phase)
        self._phase = phase

    @contextmanager
    def phase(self, phase: str):
        """``with opt.phase("forget"): opt.step()``: steps inside are ``phase`` steps."""
        previous, self.current_phase = self._phase, phase
        try:
            yield self
        finally:
            self._phase = previous

    # ------------------------------------------------------------------ step
    def step(self, closure=None, phase: str | None = None):
        """One SFR-on step of ``phase`` (default: the current phase, ``"remain"`` unless set)."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS
                or _GLOBAL_POST_HOOKS or torch.autograd.profiler._is_profiler_enabled):
            # the hooks see the arguments as given
            return self._observed_step(*(() if closure is None else (closure,)),
                                       **({} if phase is None else {"phase": phase}))
        return self._step(closure, phase)

    # torch's Optimizer would wrap step() in its hook runner and profiler range on every call; that runs
    # (as _observed_step) only when a hook is registered or a profiler is on, and costs nothing otherwise
    step.hooked = True

    @torch.no_grad()
    def _step(self, closure=None, phase: str | None = None):
        phase = self._phase if phase is None else phase
        _groups.check_phase(phase)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self._checked(groups)
        plan, grads = self._plans.get(groups, self._version, self._make_plan)
        F.run_step(plan, grads, groups, forget=phase == "forget", check_finite=self.check_finite,
                   skipped=self._skipped.counter, loss=loss.detach() if torch.is_tensor(loss) else None)
        return loss

    _observed_step = Optimizer.profile_hook_step(_step)

    def _make_plan(self, grads) -> F.StepPlan:
        """A plan for the flat gradient list ``grads``. Everything is checked before the state it needs is made."""
        groups = _state.step_tensors(self.state, self.param_groups, grads, self._sync_counts)
        try:
            plan = F.StepPlan(groups.tensors, groups.grads, self._impl_for,
                              [label for _, _, label in _mask.named_params(self.param_groups)])
        except Exception:
            groups.undo()  # a refused step leaves no state behind
            raise
        if plan.devices:
            self._skipped.on(plan.devices[0])
        return plan

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped (a non-finite direction or tensor hyperparameter); reading it synchronises."""
        return self._skipped.total

    # ------------------------------------------------------------------ slow weights
    def slow_weights(self) -> list:
        """The slow weights aligned with the parameters (the parameters themselves where there are none)."""
        return _state.slow_weights(self.state, self._params())

    @contextmanager
    def use_slow_weights(self):
        """Swap the slow weights into the parameters (for evaluation) and back afterwards."""
        with _state.slow_weights_swapped_in(self.state, self._params()):
            yield self

    # ------------------------------------------------------------------ saliency
    def accumulate_fisher(self, which: str, scale: float = 1.0, grad_scaler=None) -> bool:
        """``F_which += scale * grad^2`` for every parameter with a gradient, after a backward; ``False`` if a
        ``grad_scaler``'s batch overflowed and was left out (:func:`sfron_ops.fisher.accumulate_into`)."""
        return fisher.accumulate_into(self, which, scale, grad_scaler, impl=self._impl_for)

    def fisher(self, which: str) -> list:
        """The accumulated Fisher diagonals aligned with the parameters (``None`` where none)."""
        return fisher.diagonals(self.state, self._params(), which)

    @torch.no_grad()
    def compute_mask(self, gamma: float = 1.0, density: float | None = None) -> tuple[int, int]:
        """Set every parameter's mask from the accumulated Fisher, ``m = [(F_f + eps) / (F_r + eps) >= gamma]``
        or the ``density`` share of largest ratios (:func:`sfron_ops.fisher.mask_from`); return ``(kept, total)``."""
        params = self._params()
        result = fisher.mask_from(self.state, params, gamma, density, impl=self._impl_for)
        packing.store_all(self.state, [(p, None, m) for p, m in zip(params, result.masks)], self.mask_format)
        return result.kept, result.total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """torch's state dict, with its format tag and the counters that live on the device."""
        counts = [self._sync_counts.get(id(g)) for g in self.param_groups]
        return _checkpoint.tagged(super().state_dict(), self.skipped_steps, counts)

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict after checking all of it (a bad one raises and changes nothing).

        A parameter whose saved state holds no mask keeps the mask this optimizer has for it.
        """
        named = _mask.named_params(self.param_groups)
        _checkpoint.check(self, state_dict, named)
        state_dict, skipped, restore, kept = _checkpoint.prepare(self, state_dict, named)
        super().load_state_dict(state_dict)
        _checkpoint.restore(self, restore, kept)
        self._reset_runtime(skipped)
