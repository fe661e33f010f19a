"""SFRon's param groups: what each hyperparameter accepts, which parameters a group may hold, and
what a group's structure is (the state and the step plan it calls for).

Every number must be finite: an infinite ``lr``, ``momentum`` or ``weight_decay`` would turn the weights
into infinities and NaNs that no later step can undo. ``lr`` and ``forget_alpha`` may also be 0-dim
floating tensors (schedules fill them in place); their value is checked whenever a tensor is first
seen in a group, and a device tensor that a schedule later fills with a negative or non-finite value
makes the step a skipped one (the kernels look at it on the device; reading it on the host would
synchronise every step).
"""

from __future__ import annotations

import math
import operator

import torch

BASES = ("sgd", "adamw")
PHASES = ("forget", "remain")

#: the keys of a param group besides "params" (and "param_names"), with SFRon's defaults
DEFAULTS = dict(lr=1e-3, base="sgd", momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                betas=(0.9, 0.999), eps=1e-8, forget_alpha=1.0, max_grad_norm=None, remain_max_grad_norm=None,
                slow_alpha=1.0, sync_period=1, reset_fast=True)

#: hyperparameters that may be 0-dim tensors, read where the kernels run
TENSOR_KEYS = ("lr", "forget_alpha")


def _where(where: str | None) -> str:
    return f" in {where}" if where else ""


def check_number(name, value, low=None, high=None, low_open=False, high_open=False, where=None, expect=None):
    """A finite real number within the bounds, else ``ValueError("Invalid <name>: <value> ...")``."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        raise ValueError(f"Invalid {name}: {value!r}{_where(where)}" + (f"; expected {expect}" if expect else ""))


def check_scalar(name, value, where=None, read_tensors=True) -> None:
    """``lr`` or ``forget_alpha``: a finite number >= 0, or a real floating tensor of one element holding one
    (its value read only with ``read_tensors``)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"Invalid {name}: a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
                             f"{_where(where)}; expected a 0-dim floating tensor (or a number)")
        if not read_tensors:
            return
        number = float(value)
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"Invalid {name}: {number!r} (a tensor){_where(where)}; expected a finite number >= 0")
        return
    check_number(name, value, low=0.0, where=where, expect="a finite number >= 0")


def check_phase(phase) -> None:
    if phase not in PHASES:
        raise ValueError(f"Invalid phase: {phase!r}; expected 'forget' or 'remain'")


def check_options(mask_format, check_finite, formats) -> None:
    """SFRon's options that are not param-group keys (``impl`` aside)."""
    if mask_format not in formats:
        raise ValueError(f"Invalid mask_format: {mask_format!r}; expected one of {formats}")
    if not isinstance(check_finite, bool):
        raise ValueError(f"Invalid check_finite: {check_finite!r}")


def check_group(group: dict, where: str | None = None, read_tensors: bool = True) -> None:
    """Raise ``ValueError`` naming the first bad hyperparameter of a param group (``where``: which group)."""
    if group["base"] not in BASES:
        raise ValueError(f"Invalid base: {group['base']!r}{_where(where)}; expected one of {BASES}")
    for key in TENSOR_KEYS:
        check_scalar(key, group[key], where, read_tensors)
    check_number("momentum", group["momentum"], low=0.0, where=where, expect="a finite number >= 0")
    check_number("dampening", group["dampening"], low=0.0, high=1.0, where=where, expect="a number in [0, 1]")
    check_number("weight_decay", group["weight_decay"], low=0.0, where=where, expect="a finite number >= 0")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"Invalid nesterov: {group['nesterov']!r}{_where(where)}; expected True or False")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov: True needs momentum > 0 and dampening = 0 (got momentum={group['momentum']!r}, "
            f"dampening={group['dampening']!r}){_where(where)}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}{_where(where)}; expected two numbers in [0, 1)")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True, where=where, expect="a number in [0, 1)")
    check_number("eps", group["eps"], low=0.0, where=where, expect="a finite number >= 0")
    for key in ("max_grad_norm", "remain_max_grad_norm"):
        if group[key] is not None:
            check_number(key, group[key], low=0.0, low_open=True, where=where, expect="None or a finite number > 0")
    check_number("slow_alpha", group["slow_alpha"], low=0.0, high=1.0, where=where, expect="a number in [0, 1]")
    period = group["sync_period"]
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"Invalid sync_period: {period!r}{_where(where)}; expected an int >= 1")
    if not isinstance(group["reset_fast"], bool):
        raise ValueError(f"Invalid reset_fast: {group['reset_fast']!r}{_where(where)}; expected True or False")
    count = group.get("remain_steps", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < period:
        raise ValueError(f"Invalid remain_steps: {count!r}{_where(where)}; expected an int in [0, sync_period)")


class Checked:
    """Checks every group's hyperparameters before a step, again only when a value changed since the last check."""

    def __init__(self):
        self._seen = None

    def _same(self, seen: list) -> bool:
        # by identity, which reads no tensor: a value put in again as a new object is checked again. The
        # snapshot holds the old objects, so an identity cannot be reused by a new one.
        old = self._seen
        return (old is not None and len(old) == len(seen)
                and all(len(a) == len(b) and all(map(operator.is_, a, b)) for a, b in zip(old, seen)))

    def __call__(self, groups) -> None:
        if torch.compiler.is_compiling():  # the values are constants of the graph: checked while tracing
            for gi, group in enumerate(groups):
                check_group(group, f"param_groups[{gi}]", read_tensors=False)
            return
        seen = [tuple(group.values()) for group in groups]
        if not self._same(seen):  # groups edited since the last step (a schedule, say): check them all
            for gi, group in enumerate(groups):
                check_group(group, f"param_groups[{gi}]")
            self._seen = seen


def slow_active(group) -> bool:
    """Whether the group keeps slow weights; a = 1 with a reset is the identity (the official CIFAR-10 setting)."""
    return not (group["slow_alpha"] == 1.0 and group["reset_fast"])


def structure(group) -> tuple:
    """The hyperparameters that decide which state a group has (a step plan depends on them)."""
    return group["base"], group["momentum"] != 0, slow_active(group)


def unique_params(param_group: dict) -> dict:
    """``param_group`` with its params as a list, refused if a parameter appears twice: each step would update
    it twice, and each backend differently (torch only warns)."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif not isinstance(params, set):  # torch refuses sets itself, naming the problem
        params = list(params)
    seen = {}
    for i, item in enumerate(params):
        p = item[1] if isinstance(item, tuple) else item
        if torch.is_tensor(p) and seen.setdefault(id(p), i) != i:
            raise ValueError(f"a parameter appears twice in a param group (positions {seen[id(p)]} and {i}); give "
                             "each parameter once")
    return dict(param_group, params=params)


def check_params(group: dict, where: str) -> None:
    """SFRon updates real floating tensors."""
    for i, p in enumerate(group["params"]):
        if not p.is_floating_point():
            raise ValueError(f"{where}['params'][{i}] has dtype {p.dtype}; SFRon updates real floating tensors")

