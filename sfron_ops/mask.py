"""(S) forget-remain balanced weight saliency: masks from two Fisher diagonals, by ratio or by density."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch

from . import _dtensor
from . import functional as F
from .reference import saliency_ratio

# wrappers that prefix parameter names: DDP/DataParallel, torch.compile, FSDP1, activation checkpointing
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def canonical_name(name: str) -> str:
    """A parameter name without the prefixes that wrappers add (``module.``, ``_orig_mod.``, ...)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def named_params(param_groups) -> list:
    """``[(canonical name or None, param, label for messages)]`` of an optimizer's parameters in group order."""
    out = []
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            name = names[pi] if names is not None else None
            label = repr(name) if name is not None else f"param_groups[{gi}]['params'][{pi}] (#{len(out)})"
            out.append((None if name is None else canonical_name(name), p, label))
    return out


def assign(named, mask) -> list:
    """Pair the masks a user gave with the parameters: ``[(param, label, checked mask)]``, nothing stored.

    ``named``: ``[(canonical name or None, param, label for messages)]``. ``mask``: a list aligned
    with the parameters (``None`` entries skipped), or a dict keyed by parameter name or by tensor.
    Every mask is checked before the first is returned, so a bad one changes nothing.
    """
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
    return [(p, label, checked(p, label, m)) for p, label, m in assigned]


def validate(p, label, m) -> None:
    """Raise naming parameter ``label`` unless ``m`` can be its mask: a tensor of its shape, and binary
    (bool or uint8 holding only 0 and 1, one byte per element) or floating point with finite values."""
    if not torch.is_tensor(m):
        raise TypeError(f"mask for parameter {label} must be a tensor, got {type(m).__name__}")
    if not (m.dtype in (torch.bool, torch.uint8) or m.is_floating_point()):
        raise ValueError(f"mask for parameter {label} has dtype {m.dtype}; expected bool, uint8 or floating point")
    if m.shape != p.shape:
        raise ValueError(f"mask for parameter {label} has shape {tuple(m.shape)}, expected {tuple(p.shape)}")
    if m.device.type == "meta":
        raise ValueError(f"mask for parameter {label} is on the meta device (no data); the parameter is on {p.device}")
    local = _dtensor.to_local(m)
    if local.numel() == 0:
        return
    if m.is_floating_point():
        if not bool(torch.isfinite(local).all()):
            raise ValueError(f"mask for parameter {label} holds a NaN or an infinity; a soft mask needs finite values")
    elif bool((local.view(torch.uint8) > 1).any()):  # a bool view of other bytes is not 0/1 either
        value = int(local.view(torch.uint8).max())
        raise ValueError(f"mask for parameter {label} holds the byte value {value}; a {m.dtype} mask must hold 0 and 1 "
                         "only (scale a soft mask as a floating point one)")


def checked(p, label, m):
    """``m`` checked as the mask of parameter ``p`` (:func:`validate`) and placed like it (a copy when it moves)."""
    validate(p, label, m)
    if m.device != p.device:
        m = m.to(p.device)  # a copy on the parameter's device; the caller's tensor is untouched
    return _dtensor.shard_like(m, p)  # placed like a DTensor (FSDP2) parameter


class SaliencyMask(NamedTuple):
    """Masks in the structure they were asked for, and how many elements they keep."""

    masks: list | dict
    kept: int
    total: int


# ---------------------------------------------------------------------------------------------- density rule
def check_density(density) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"Invalid density: {density!r}; expected a number in [0, 1]")


def density_count(density: float, total: int) -> int:
    """``ceil(density * total)`` in exact arithmetic, with ``density`` read as the decimal it prints as:
    0.3 of 10 elements is 3 (``math.ceil(0.3 * 10)`` gives 4) and 0.4 of 5 is 2 (the binary value
    of 0.4, a little above it, would give 3)."""
    return math.ceil(Fraction(repr(float(density))) * total)


def density_cutoff(flat: torch.Tensor, k: int) -> tuple[float, int]:
    """Where the ``k`` largest values of the 1-D ``flat`` end: the smallest kept value ``c`` and how many
    elements equal to ``c`` are kept (the rest of ``k`` lies strictly above ``c``). ``k = 0``: ``(inf, 0)``."""
    if k == 0:
        return math.inf, 0
    if torch.isnan(flat).any():
        raise ValueError("the scores to rank hold NaN (a NaN Fisher entry or gradient); no density mask is defined")
    cutoff = torch.kthvalue(flat, flat.numel() - k + 1).values
    return float(cutoff), k - int((flat > cutoff).sum())


def keep_top(score: torch.Tensor, cutoff: float, last_tie: int, global_index=None) -> torch.Tensor:
    r"""The boolean mask :math:`s > c \;\lor\; (s = c \land \text{index} \le \text{last\_tie})`.

    ``index`` is the element's flat index in the global order (``global_index(local flat positions)``;
    by default the local flat position): ties at the cut-off are kept from the lowest index up.
    """
    score = score.contiguous()
    keep = score > cutoff
    if last_tie >= 0:
        tied = (score == cutoff).view(-1).nonzero().view(-1)
        if tied.numel():
            index = tied if global_index is None else global_index(tied)
            keep.view(-1)[tied[index <= last_tie]] = True
    return keep


def density_mask(scores, density: float, *, dtype: torch.dtype = torch.bool) -> SaliencyMask:
    r"""Keep exactly :math:`\lceil \rho N \rceil` elements: the largest ``scores`` over all tensors together.

    Ties at the cut-off are broken by the flat index over the tensors in order (lower first), so
    that the count is exact whatever the number of equal scores (many exact-zero gradients, say).
    DTensor scores (FSDP2) give DTensor masks placed like them and exactly one process's masks:
    the cut-off comes from every rank's scores, the ties from their global flat indices.

    Args:
        scores: a list or dict of tensors (any devices); the ranking is global.
        density: :math:`\rho \in [0, 1]`.
        dtype: ``torch.bool`` or ``torch.uint8``.
    """
    check_density(density)
    keys = list(scores) if isinstance(scores, dict) else None
    tensors = [scores[k] for k in keys] if keys is not None else list(scores)
    group = _dtensor.placed_group(tensors)
    local = [_dtensor.to_local(t).detach().float() for t in tensors]
    # each element is ranked once: a tensor replicated over the ranks is counted by one of them
    counted = [group is None or _dtensor.counts_here(t, group) for t in tensors]
    total = sum(t.numel() for t in tensors)
    mine = [s.reshape(-1).cpu() for s, c in zip(local, counted) if c]
    cutoff, ties = density_cutoff(_dtensor.gather_1d(torch.cat(mine) if mine else torch.empty(0), group),
                                  density_count(density, total))
    offsets = [0]
    for t in tensors[:-1]:
        offsets.append(offsets[-1] + t.numel())
    index_of = [_dtensor.global_index(t, o) for t, o in zip(tensors, offsets)]
    last_tie = -1
    if ties:  # the lowest `ties` global indices among the elements equal to the cut-off, over every rank
        tied = [index_of[i]((s == cutoff).view(-1).nonzero().view(-1)).cpu()
                for i, (s, c) in enumerate(zip(local, counted)) if c]
        tied = torch.cat(tied).sort().values[:ties] if tied else torch.empty(0, dtype=torch.int64)
        last_tie = int(_dtensor.gather_1d(tied, group).sort().values[ties - 1])
    masks = [keep_top(s, cutoff, last_tie, index_of[i]).to(dtype) for i, s in enumerate(local)]
    kept = _dtensor.sum_ints([sum(int(m.count_nonzero()) for m, c in zip(masks, counted) if c)], group)[0]
    masks = [_dtensor.wrap_like(m, t) for m, t in zip(masks, tensors)]
    return SaliencyMask(dict(zip(keys, masks)) if keys is not None else masks, kept, total)


# ---------------------------------------------------------------------------------------------- saliency
def saliency_mask(forget_fisher, remain_fisher, gamma: float = 1.0, density: float | None = None, *,
                  dtype: torch.dtype = torch.bool, impl=None) -> SaliencyMask:
    r"""Saliency masks from forget and remain Fisher diagonals.

    .. math::
       m = \big[(F_f + \varepsilon) / (F_r + \varepsilon) \ge \gamma\big], \quad \varepsilon = 10^{-15}

    With ``density`` (SalUn-style) exactly :math:`\lceil \rho N \rceil` elements are kept instead:
    the largest ratios over all tensors together, ties at the cut-off broken by the flat index over
    the tensors in order (lower first; see :func:`density_mask`).

    Args:
        forget_fisher, remain_fisher: aligned lists, or dicts with the same keys, of Fisher diagonals.
        gamma: the ratio threshold (ignored when ``density`` is given).
        density: the share of elements to keep, in ``[0, 1]``.
        dtype: ``torch.bool`` or ``torch.uint8``.
        impl: the kernel backend of the ratio rule (the density rule runs in plain PyTorch).

    Returns:
        ``SaliencyMask(masks, kept, total)``, ``masks`` shaped like the inputs. DTensor Fisher diagonals
        (FSDP2: ``fisher_diagonal`` of a ``fully_shard`` model, or an optimizer's) give DTensor masks placed
        like them; ``kept`` and ``total`` count the global tensors, each element once, and with ``density``
        the masks are exactly one process's on the full tensors.
    """
    keys = None
    if isinstance(forget_fisher, dict):
        if not isinstance(remain_fisher, dict):
            raise TypeError(f"forget_fisher is a dict but remain_fisher is a {type(remain_fisher).__name__}")
        only_forget = [k for k in forget_fisher if k not in remain_fisher]
        only_remain = [k for k in remain_fisher if k not in forget_fisher]
        if only_forget or only_remain:
            def some(keys):
                return ", ".join(map(repr, keys[:5])) + (" ..." if len(keys) > 5 else "")

            raise ValueError("forget_fisher and remain_fisher must have the same keys; " + "; ".join(
                f"only in {side}: {some(ks)}" for side, ks in (("forget_fisher", only_forget),
                                                              ("remain_fisher", only_remain)) if ks))
        keys = list(forget_fisher)
        forget, remain = [forget_fisher[k] for k in keys], [remain_fisher[k] for k in keys]
    else:
        forget, remain = list(forget_fisher), list(remain_fisher)
        if len(forget) != len(remain):
            raise ValueError(f"forget_fisher has {len(forget)} tensors but remain_fisher has {len(remain)}")
    labels = keys if keys else range(len(forget))
    for label, f, r in zip(labels, forget, remain):
        for side, t in (("forget_fisher", f), ("remain_fisher", r)):
            if not torch.is_tensor(t) or not t.is_floating_point():
                raise TypeError(f"{side}[{label!r}] must be a floating point tensor, got "
                                f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
        if f.shape != r.shape:
            raise ValueError(f"Fisher shapes differ for {label!r}: {tuple(f.shape)} and {tuple(r.shape)}")
        if f.device != r.device:
            raise ValueError(f"Fisher devices differ for {label!r}: {f.device} and {r.device}")
        placements = [(t.device_mesh, tuple(t.placements)) if _dtensor.is_dtensor(t) else None for t in (f, r)]
        if placements[0] != placements[1]:
            raise ValueError(f"Fisher placements differ for {label!r}: {placements[0]} and {placements[1]} "
                             "(None: a plain tensor)")
    # under FSDP2 every rank checks its shards, and all of them raise for the first bad tensor
    group = _dtensor.placed_group(forget + remain)
    pairs = [_dtensor.to_local(t) for pair in zip(forget, remain) for t in pair]
    bad = _dtensor.sum_ints([int(not bool((torch.isfinite(t) & (t >= 0)).all())) for t in pairs], group)
    if any(bad):
        i = next(i for i, b in enumerate(bad) if b)
        raise ValueError(f"{('forget_fisher', 'remain_fisher')[i % 2]}[{list(labels)[i // 2]!r}] holds a negative, "
                         "NaN or infinite value; a Fisher diagonal is a mean of squares")
    if dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"Invalid dtype: {dtype}; expected torch.bool or torch.uint8")
    if density is not None:
        check_density(density)
    elif isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
        # every ratio is positive: gamma <= 0 would keep every weight
        raise ValueError(f"Invalid gamma: {gamma!r}; expected a finite number > 0")

    if density is not None:
        masks, kept, total = density_mask([saliency_ratio(f, r) for f, r in zip(forget, remain)], density,
                                          dtype=dtype)
    else:
        local_f = [_dtensor.to_local(f).to(torch.float32) for f in forget]
        local_r = [_dtensor.to_local(r).to(torch.float32) for r in remain]
        masks = [torch.empty(f.shape, dtype=dtype, device=f.device) for f in local_f]
        # each element is counted once: a tensor replicated over the ranks is counted by one of them
        counted = [group is None or _dtensor.counts_here(f, group) for f in forget]
        kept = 0
        for part in (True, False):
            idx = [i for i, c in enumerate(counted) if c == part]
            if idx:
                n = F.saliency_mask_([local_f[i] for i in idx], [local_r[i] for i in idx], [masks[i] for i in idx],
                                     gamma=gamma, impl=impl)
                kept += n if part else 0
        kept = _dtensor.sum_ints([kept], group)[0]
        total = sum(f.numel() for f in forget)
        masks = [_dtensor.wrap_like(m, f) for m, f in zip(masks, forget)]
    return SaliencyMask(dict(zip(keys, masks)) if keys is not None else masks, kept, total)
