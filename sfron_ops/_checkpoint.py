"""SFRon state dicts: the format tag, and the check of a whole state dict before any of it is loaded.

A state dict written by :meth:`sfron_ops.SFRon.state_dict` carries ``"format": FORMAT``. Loading checks
everything first (the groups' hyperparameters, every state entry's kind, shape, dtype and values, the
base optimizer's state matching the group's base, packed masks' byte counts, the counters), so a bad
state dict raises an error that names the entry and leaves the optimizer exactly as it was. State
dicts of earlier versions of this package (no tag, but SFRon's param-group keys) load as before; a
foreign optimizer's state dict (``torch.optim.SGD``, say) is refused with a note on how to carry its
state over.
"""

from __future__ import annotations

import math

import torch

from . import _dtensor, _groups
from ._state import BASE_KEYS, into_blocks
from .mask import validate

FORMAT = "sfron_ops.SFRon/2"

KNOWN_KEYS = ("step", "momentum_buffer", "exp_avg", "exp_avg_sq", "slow_param", "mask", "packed_mask",
              "fisher_forget", "fisher_remain")
#: state entries the torch loader must not cast to the parameter's dtype: Fisher accumulators stay
#: float32, masks keep the dtype they were given (packed ones uint8)
KEEP_DTYPE = ("mask", "packed_mask", "fisher_forget", "fisher_remain")


def _finite(t) -> bool:
    t = _dtensor.to_local(t)
    return t.numel() == 0 or bool(torch.isfinite(t).all())


def _check_foreign(state_dict) -> None:
    groups = state_dict["param_groups"]
    missing = [k for k in ("base", "forget_alpha") if groups and k not in groups[0]]
    if missing:
        keys = sorted(k for k in groups[0] if k not in ("params", "param_names"))
        raise ValueError(
            "this state dict is not an SFRon one: its param groups have no "
            f"{' or '.join(repr(k) for k in missing)} (they hold {keys}; a torch.optim optimizer's, perhaps). "
            "To carry a torch.optim.SGD or AdamW state over, build SFRon with the same hyperparameters and base, "
            "take one step, then copy the old optimizer's 'momentum_buffer' (or 'exp_avg', 'exp_avg_sq' and "
            "'step') tensors into opt.state[p]")


def check(opt, state_dict, named) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first problem of ``state_dict`` for optimizer ``opt``.

    ``named``: the optimizer's ``[(canonical name, param, label)]`` in group order.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise TypeError("an optimizer state dict is a dict with 'state' and 'param_groups'")
    tag = state_dict.get("format")
    if tag is None:
        _check_foreign(state_dict)
    elif tag != FORMAT:
        raise ValueError(f"this state dict is of format {tag!r}; this version of sfron_ops reads {FORMAT!r}")
    saved_groups, groups = state_dict["param_groups"], opt.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} param groups, the optimizer {len(groups)}")
    params = [p for _, p, _ in named]
    labels = {id(p): label for _, p, label in named}
    ids = []
    for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param_groups[{gi}] of the state dict has {len(saved['params'])} parameters, the "
                             f"optimizer's {len(group['params'])}")
        _groups.check_group({**_groups.DEFAULTS, **{k: v for k, v in saved.items() if k != "params"}},
                           where=f"param_groups[{gi}] of the state dict")
        ids.extend((pid, saved.get("base", "sgd"), opt.mask_format) for pid in saved["params"])
    skipped = state_dict.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"Invalid skipped_steps: {skipped!r} in the state dict; expected an int >= 0")
    state = state_dict["state"]
    unknown = set(state) - {pid for pid, _, _ in ids}
    if unknown:
        raise ValueError(f"the state dict has state for parameter ids {sorted(unknown)} that no param group lists")
    for (pid, base, mask_format), p in zip(ids, params):
        entries = state.get(pid)
        if entries:
            _check_entries(entries, p, base, mask_format, labels[id(p)])


def _check_entries(entries: dict, p, base: str, mask_format: str, label: str) -> None:
    where = f"the state of parameter {label}"
    if not isinstance(entries, dict):
        raise TypeError(f"{where} is a {type(entries).__name__}, expected a dict")
    for key, value in entries.items():
        if key not in KNOWN_KEYS:
            raise ValueError(f"{where} has an entry {key!r} that SFRon does not keep ({', '.join(KNOWN_KEYS)})")
        if not torch.is_tensor(value):
            raise TypeError(f"{where}: {key!r} is a {type(value).__name__}, expected a tensor")
        if value.is_complex():
            raise ValueError(f"{where}: {key!r} has complex dtype {value.dtype}")
    other = [k for k in BASE_KEYS["adamw" if base == "sgd" else "sgd"] if k in entries]
    if other:
        raise ValueError(f"{where} has {other[0]!r}, which base={base!r} does not keep: the state dict mixes bases")
    base_entries = [k for k in BASE_KEYS[base] + ("slow_param",) if k in entries]
    if base_entries and "step" not in entries:
        raise ValueError(f"{where} has {base_entries[0]!r} but no 'step'")
    if base == "adamw" and "step" in entries and not all(k in entries for k in BASE_KEYS["adamw"]):
        raise ValueError(f"{where} has a 'step' but not both 'exp_avg' and 'exp_avg_sq' (base='adamw')")
    if "step" in entries:
        step = entries["step"]
        value = float(step) if step.numel() == 1 and not step.is_complex() else math.nan
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            raise ValueError(f"{where}: 'step' must hold one whole number >= 0, got {step!r}")
    for key in BASE_KEYS[base] + ("slow_param",):
        if key in entries:
            t = entries[key]
            if t.shape != p.shape or not t.is_floating_point():
                raise ValueError(f"{where}: {key!r} has shape {tuple(t.shape)} and dtype {t.dtype}; expected the "
                                 f"parameter's shape {tuple(p.shape)} and a floating dtype")
            if not _finite(t):
                raise ValueError(f"{where}: {key!r} holds a NaN or an infinity")
    for key in ("fisher_forget", "fisher_remain"):
        if key in entries:
            t = entries[key]
            if t.shape != p.shape or t.dtype != torch.float32:
                raise ValueError(f"{where}: {key!r} has shape {tuple(t.shape)} and dtype {t.dtype}; expected the "
                                 f"parameter's shape {tuple(p.shape)} in torch.float32")
            if not _finite(t) or bool((_dtensor.to_local(t) < 0).any()):
                raise ValueError(f"{where}: {key!r} must hold finite numbers >= 0")
    if "mask" in entries and "packed_mask" in entries:
        raise ValueError(f"{where} has both 'mask' and 'packed_mask'")
    if "mask" in entries:
        m = entries["mask"]
        validate(p, label, m)
        if mask_format == "packed" and m.is_floating_point():
            raise ValueError(f"the loaded mask for parameter {label} is floating point (soft saliency); "
                             "mask_format='packed' stores binary masks only")
    if "packed_mask" in entries:
        m = entries["packed_mask"]
        expected = (_dtensor.to_local(p).numel() + 7) // 8
        local = _dtensor.to_local(m)
        if m.dtype != torch.uint8 or m.dim() != 1 or (not _dtensor.is_dtensor(p) and local.numel() != expected):
            raise ValueError(f"{where}: 'packed_mask' must be a 1-D uint8 tensor of {expected} bytes, got "
                             f"{m.dtype} of shape {tuple(m.shape)}")


def tagged(sd: dict, skipped: int, sync_counts: list) -> dict:
    """An SFRon state dict from torch's: the format tag, the skipped-step count (also in the first group, which
    torch.distributed.checkpoint keeps) and each group's remain steps since its last sync (``sync_counts``:
    the groups' device counters, ``None`` where a group has none yet)."""
    sd["format"] = FORMAT
    sd["skipped_steps"] = skipped
    # plain dicts: the state dict must load with torch.load(weights_only=True)
    sd["state"] = {key: dict(entries) for key, entries in sd["state"].items()}
    for saved, counter in zip(sd["param_groups"], sync_counts):
        if counter is not None:
            saved["remain_steps"] = int(counter)
    if sd["param_groups"]:
        sd["param_groups"][0]["skipped_steps"] = skipped
    return sd


def prepare(opt, state_dict: dict, named):
    """What torch's loader gets from a checked state dict, and what must be put back after it:
    ``(state dict, skipped steps, {param: entries kept as saved}, {param: the optimizer's own masks})``."""
    state_dict = dict(state_dict)
    state_dict.pop("format", None)
    groups = [dict(g) for g in state_dict["param_groups"]]
    in_groups = [g.pop("skipped_steps", 0) for g in groups]
    skipped = int(state_dict.pop("skipped_steps", in_groups[0] if in_groups else 0))
    state_dict["param_groups"] = groups
    params = [p for _, p, _ in named]
    saved_ids = [i for g in groups for i in g["params"]]
    # torch casts floating state to the parameter's dtype and leaves "step" where it was saved
    restore = {p: {k: v for k, v in state_dict["state"].get(pid, {}).items() if k in KEEP_DTYPE or k == "step"}
               for pid, p in zip(saved_ids, params)}
    kept = {p: {k: opt.state[p][k] for k in ("mask", "packed_mask") if k in opt.state[p]}
            for p in params if p in opt.state}
    return state_dict, skipped, restore, kept


def restore(opt, restore: dict, kept: dict) -> None:
    """After torch's loader: entries back as saved on the parameter's device, the optimizer's masks where the
    state dict had none, masks in the optimizer's format, and every group complete."""
    from . import packing

    for p, entries in restore.items():
        for k, v in entries.items():
            opt.state[p][k] = v.to(device=p.device, dtype=torch.float32 if k == "step" else v.dtype, copy=True)
        state = opt.state[p]
        if "mask" not in state and "packed_mask" not in state:
            state.update(kept.get(p, {}))
        if opt.mask_format == "packed" and "mask" in state:
            packing.store(state, p, state["mask"], "packed")
        elif opt.mask_format == "dense" and "packed_mask" in state:
            packing.store(state, p, packing.dense(state, p), "dense")
    for group in opt.param_groups:
        for key, value in opt.defaults.items():
            group.setdefault(key, value)
        group.setdefault("remain_steps", 0)
    into_blocks(opt.state, opt.param_groups)

