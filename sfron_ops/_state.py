"""Optimizer state that counts its own changes.

:class:`sfron_ops.SFRon` reuses a step plan (:class:`sfron_ops.functional.StepPlan`) that holds
references to its state tensors, so it must know when an entry is added, replaced or removed,
whoever does it: the optimizer itself, ``load_state_dict``, or a user resetting a buffer with
``opt.state[p]["momentum_buffer"] = torch.zeros_like(p)``. Changing a tensor in place needs no
notice: the plan holds that same tensor.

Each state entry of a group's plain contiguous parameters is a piece of one 1-D block per entry,
device and dtype, in parameter order (:func:`make_missing`, and :func:`into_blocks` after loading), so
that the ``foreach`` backend reads and writes a whole list as one tensor. A piece is an ordinary tensor;
replacing one just sends that list back to the per-tensor path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ._groups import slow_active
from .functional import GroupTensors
from .packing import for_kernels as kernel_mask

#: a base optimizer's state entries
BASE_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}


class Version:
    """A counter that every change of the state it watches increments."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def bump(self) -> None:
        self.value += 1


class _Counted:
    """The mutators that ``ParamState`` and ``OptimizerState`` share: each bumps the version, then changes the
    dict. (Each is written out with ``super()``: torch.compile traces those, so a step compiled before its
    state exists can create it.)"""

    def __delitem__(self, key):
        self._version.bump()
        super().__delitem__(key)

    def pop(self, *args):
        self._version.bump()
        return super().pop(*args)

    def popitem(self):
        self._version.bump()
        return super().popitem()

    def clear(self):
        self._version.bump()
        super().clear()


class ParamState(_Counted, dict):
    """One parameter's state entries."""

    def __init__(self, version: Version, entries=()):
        super().__init__(entries)
        self._version = version

    def __setitem__(self, key, value):
        self._version.bump()
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        self._version.bump()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._version.bump()
        return super().setdefault(key, default)

    def __reduce__(self):  # pickles and copies as a plain dict
        return dict, (dict(self),)


class OptimizerState(_Counted, defaultdict):
    """``{param: ParamState}``; a missing parameter gets an empty state, as in torch's optimizers."""

    def __init__(self, version: Version, entries=()):
        super().__init__()
        self._version = version
        for key, value in dict(entries).items():
            super().__setitem__(key, ParamState(version, value))

    def __missing__(self, key):
        state = ParamState(self._version)
        super().__setitem__(key, state)
        return state

    def __setitem__(self, key, value):
        self._version.bump()
        super().__setitem__(key, ParamState(self._version, value))

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self):  # pickles and copies as torch's defaultdict(dict)
        return defaultdict, (dict, {key: dict(value) for key, value in self.items()})


class Skipped:
    """The skipped-step count: a float64 counter on the device the steps run on (counting needs no host
    read), plus what was counted before it was made or moved."""

    def __init__(self, before: int = 0):
        self.counter, self.before = None, before

    def on(self, device: torch.device) -> None:
        """Count on ``device`` from now on."""
        if self.counter is None or self.counter.device != device:
            self.before, self.counter = self.total, torch.zeros((), dtype=torch.float64, device=device)

    @property
    def total(self) -> int:
        return self.before + (0 if self.counter is None else int(self.counter))


class StepTensors(NamedTuple):
    """What a step plan is made from: each group's tensors and gradients, and the state entries made for them."""

    tensors: list  # functional.GroupTensors per group
    grads: list  # per group
    created: list  # (entries, key) of every state entry made

    def undo(self) -> None:
        for entries, key in self.created:
            entries.pop(key, None)


def step_tensors(state: OptimizerState, groups: list, grads: list, sync_counts: dict) -> StepTensors:
    """The groups' tensors for a step over the flat gradient list ``grads``, with the state each group's
    structure calls for (see :func:`make_missing`) and each slow-weight group's sync counter on its device
    (``sync_counts``: ``{id(group): counter}``, started from ``group["remain_steps"]``)."""
    tensors, per_group, created, start = [], [], [], 0
    for group in groups:
        params = group["params"]
        group_grads = grads[start:start + len(params)]
        start += len(params)
        per_group.append(group_grads)
        make_missing(state, group, params, group_grads, created)
        states = [state.get(p, {}) for p in params]
        keys = BASE_KEYS[group["base"]] if group["base"] == "adamw" or group["momentum"] != 0 else ()
        slow = slow_active(group) and bool(params)
        counter = None
        if slow:
            device = params[0].device
            counter = sync_counts.get(id(group))
            if counter is None or counter.device != device:
                begin = group["remain_steps"] if counter is None else float(counter)
                counter = sync_counts[id(group)] = torch.full((), float(begin), dtype=torch.float32, device=device)
        tensors.append(GroupTensors(
            params=params, masks=[kernel_mask(s, p) for s, p in zip(states, params)],
            steps=[s.get("step") for s in states], state=[[s.get(k) for s in states] for k in keys],
            slow_params=[s.get("slow_param") for s in states] if slow else [], sync_counter=counter))
    return StepTensors(tensors, per_group, created)


def make_missing(state: OptimizerState, group: dict, params, grads, created: list) -> None:
    """Create the state a group's structure calls for: a step counter for every parameter with a gradient, and
    for every parameter with a counter its base optimizer's buffers and, with slow weights, its slow copy.
    Each entry made is appended to ``created`` as ``(state, key)``, so a refused step can take them back."""
    keys = (("momentum_buffer",) if group["base"] == "sgd" and group["momentum"] != 0 else ()) + (
        ("exp_avg", "exp_avg_sq") if group["base"] == "adamw" else ()) + (
        ("slow_param",) if slow_active(group) else ())
    wanted = defaultdict(list)  # key -> [(entries, param)]
    for p, g in zip(params, grads):
        entries = state.get(p)
        if entries is None or "step" not in entries:
            if g is None:  # no gradient yet: no state, as in torch's optimizers
                continue
            entries = state[p]
            wanted["step"].append((entries, p))
        for key in keys:
            if key not in entries:
                wanted[key].append((entries, p))
    for key, owners in wanted.items():
        for (entries, _), value in zip(owners, _allocate(key, [p for _, p in owners])):
            entries[key] = value
            created.append((entries, key))


def _plain(t) -> bool:
    """Whether ``t`` may be a piece of a block: a plain contiguous tensor (not a DTensor, not channels-last)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_contiguous()


def _by_device_and_dtype(params: list) -> list:
    """The positions in ``params``, grouped by device and dtype (so the groups are the step's buckets)."""
    groups = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return list(groups.values())


def _cut(block: torch.Tensor, shapes: list) -> list:
    """``block`` cut, in order, into views of ``shapes``."""
    numels = [math.prod(shape) for shape in shapes]
    return [piece.view(shape) for piece, shape in zip(block.split(numels), shapes)]


def _copied(values: list) -> list:
    """Copies of ``values`` cut, in order, from one new block (they share a device and a dtype)."""
    return _cut(torch.cat([v.detach().reshape(-1) for v in values]), [v.shape for v in values])


def _allocate(key: str, params: list) -> list:
    """New state entries ``key`` for ``params``: a float32 0-dim counter (``"step"``), a copy of the parameter
    (``"slow_param"``, Note [slow snapshot]: slow weights start as the parameters at their first step) or zeros.

    The entries of plain contiguous tensors are cut, in order, from one 1-D block per device and dtype, which
    the foreach backend reads and writes whole instead of tensor by tensor. Others (DTensors, other memory
    formats) get tensors of their own, as does everything made while compiling.
    """
    out = [None] * len(params)
    plain = [] if torch.compiler.is_compiling() else [i for i, p in enumerate(params) if _plain(p)]
    for where in _by_device_and_dtype([params[i] for i in plain]):
        like = [params[plain[j]] for j in where]
        if key == "step":
            pieces = _cut(torch.zeros(len(like), dtype=torch.float32, device=like[0].device), [()] * len(like))
        elif key == "slow_param":
            pieces = _copied(like)
        else:
            block = torch.zeros(sum(p.numel() for p in like), dtype=like[0].dtype, device=like[0].device)
            pieces = _cut(block, [p.shape for p in like])
        for j, piece in zip(where, pieces):
            out[plain[j]] = piece
    for i, p in enumerate(params):
        if out[i] is None:
            if key == "step":
                out[i] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                out[i] = p.detach().clone() if key == "slow_param" else torch.zeros_like(p)
    return out


def into_blocks(state: OptimizerState, param_groups) -> None:
    """Copy each group's state entries into blocks, as :func:`make_missing` allocates them (loaded state
    comes tensor by tensor)."""
    for group in param_groups:
        for key in ("step", *BASE_KEYS["sgd"], *BASE_KEYS["adamw"], "slow_param"):
            params = [p for p in group["params"] if _plain(p) and key in state.get(p, {})]
            for where in _by_device_and_dtype(params):
                owners = [params[i] for i in where]
                values = [state[p][key] for p in owners]
                if all(_plain(v) and v.device == p.device and v.dtype == values[0].dtype
                       for v, p in zip(values, owners)):
                    for p, piece in zip(owners, _copied(values)):
                        state[p][key] = piece


def slow_weights(state: OptimizerState, params) -> list:
    """The slow weights of ``params`` (a parameter itself, detached, where it has none)."""
    return [state[p]["slow_param"] if "slow_param" in state.get(p, {}) else p.detach() for p in params]


@contextmanager
def slow_weights_swapped_in(state: OptimizerState, params):
    """Within the block, each parameter that has slow weights holds them; afterwards its own values again."""
    pairs = [(p, state[p]["slow_param"]) for p in params if "slow_param" in state.get(p, {})]
    with torch.no_grad():
        backups = [p.detach().clone() for p, _ in pairs]
        for p, s in pairs:
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), b in zip(pairs, backups):
                p.copy_(b)
