"""Optimizer state that counts its own changes.

:class:`sfron_ops.SFRon` reuses a step plan (:class:`sfron_ops.functional.StepPlan`) that holds
references to its state tensors, so it must know when an entry is added, replaced or removed,
whoever does it: the optimizer itself, ``load_state_dict``, or a user resetting a buffer with
``opt.state[p]["momentum_buffer"] = torch.zeros_like(p)``. Changing a tensor in place needs no
notice: the plan holds that same tensor.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ._groups import slow_active


class Version:
    """A counter that every change of the state it watches increments."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def bump(self) -> None:
        self.value += 1


def _changing(name):
    """``dict.<name>`` that counts a change first."""
    method = getattr(dict, name)

    def changed(self, *args, **kwargs):
        self._version.bump()
        return method(self, *args, **kwargs)

    changed.__name__ = name
    return changed


class ParamState(dict):
    """One parameter's state entries."""

    __setitem__ = _changing("__setitem__")
    __delitem__ = _changing("__delitem__")
    pop = _changing("pop")
    popitem = _changing("popitem")
    clear = _changing("clear")
    update = _changing("update")
    setdefault = _changing("setdefault")

    def __init__(self, version: Version, entries=()):
        dict.__init__(self, entries)
        self._version = version

    def __reduce__(self):  # pickles and copies as a plain dict
        return dict, (dict(self),)


class OptimizerState(defaultdict):
    """``{param: ParamState}``; a missing parameter gets an empty state, as in torch's optimizers."""

    __delitem__ = _changing("__delitem__")
    pop = _changing("pop")
    popitem = _changing("popitem")
    clear = _changing("clear")

    def __init__(self, version: Version, entries=()):
        defaultdict.__init__(self)
        self._version = version
        for key, value in dict(entries).items():
            dict.__setitem__(self, key, ParamState(version, value))

    def __missing__(self, key):
        state = ParamState(self._version)
        dict.__setitem__(self, key, state)
        return state

    def __setitem__(self, key, value):
        self._version.bump()
        dict.__setitem__(self, key, ParamState(self._version, value))

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self):  # pickles and copies as torch's defaultdict(dict)
        return defaultdict, (dict, {key: dict(value) for key, value in self.items()})


def make_missing(state: OptimizerState, group: dict, params, grads, created: list) -> None:
    """Create the state a group's structure calls for: a step counter for every parameter with a gradient, and
    for every parameter with a counter its base optimizer's buffers and, with slow weights, its slow copy.
    Each entry made is appended to ``created`` as ``(state, key)``, so a refused step can take them back."""

    def make(entries, key, value):
        entries[key] = value
        created.append((entries, key))

    for p, g in zip(params, grads):
        entries = state[p]
        if g is not None and "step" not in entries:
            make(entries, "step", torch.zeros((), dtype=torch.float32, device=p.device))
        if "step" not in entries:
            continue
        if group["base"] == "sgd" and group["momentum"] != 0 and "momentum_buffer" not in entries:
            make(entries, "momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))
        if group["base"] == "adamw" and "exp_avg" not in entries:
            make(entries, "exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            make(entries, "exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        if slow_active(group) and "slow_param" not in entries:
            # Note [slow snapshot]: slow weights start as the parameters at their first step
            make(entries, "slow_param", p.detach().clone())

