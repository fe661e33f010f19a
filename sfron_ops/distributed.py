r"""SFR-on on ``torch.distributed``: DDP and FSDP2 (``fully_shard``, DTensor parameters).

What has to agree across ranks, and how it does:

* **Gradients.** DDP all-reduces them (every rank holds the mean gradient of the
  global batch); FSDP2 reduce-scatters them (every rank holds its shard of it).
  Either way the optimizer sees the single-process gradient, replicated or sharded.
* **The forget loss.** The per-sample weights :math:`w_i = N c_i / \sum_j c_j`
  normalise over the batch; :func:`adaptive_weights` takes ``N`` and
  :math:`\sum_j c_j` over the global batch, so the data-parallel loss has the
  single-process gradient.
* **The global norm** of a step (clipping, non-finite check). The optimizer
  adds every shard's :math:`\sum u^2` once and all-reduces the two-element
  norm state ``[sum of squares, non-finite flag]`` with a sum over the ranks
  (:func:`norm_reduce_group`, :func:`norm_share`, :func:`all_reduce_norm_states`).
  Replicated tensors (DDP parameters, ``Replicate`` placements) are counted by
  one rank only, so nothing is counted twice; with no sharded parameter at all
  (DDP) nothing is reduced, because every rank already holds the whole norm.
* **Fisher and masks.** The ratio rule is elementwise, so a mask shard needs
  only its Fisher shard: under FSDP2 the Fisher state, the masks, the momentum
  and the slow weights are DTensors placed like their parameter, and the kernels
  run on the local shards. Under DDP, Fisher accumulated on synchronised
  gradients is already identical on every rank; Fisher accumulated under
  ``no_sync()`` differs per rank and :func:`all_reduce_fisher` averages it.
  The density rule (exactly ceil(rho N) kept) gathers every rank's ratios for
  its cut-off and the global flat indices of the ties at it.
* **Checkpoints.** Optimizer state is keyed by parameter like torch's, with
  DTensor entries, so ``torch.distributed.checkpoint.state_dict``'s
  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` and ``dcp.save`` /
  ``dcp.load`` work as for ``torch.optim.AdamW``. ``dcp.load`` only fills the
  entries the loading side already has, and a fresh optimizer has no masks or
  Fisher yet: :func:`prepare_checkpoint_load` allocates what the checkpoint holds.

Note that an all-reduced Fisher of per-rank gradients,
:math:`\frac1R\sum_r g_r^2`, is not the Fisher of the global-batch gradient
:math:`(\frac1R\sum_r g_r)^2`; both give every rank the same mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._dtensor import (  # noqa: F401  (the DTensor helpers are part of this module's API)
    all_reduce_norm_states,
    counts_here,
    is_dtensor,
    is_sharded,
    norm_reduce_group,
    norm_share,
    placement_kinds,
    shard_like,
    to_local,
    wrap_like,
)
from .fisher import FISHER_KEYS
from .loss import LOSS_FLOOR, WEIGHT_EPS, inverse_loss_powers, normalise_weights
from .loss import AdaptiveLoss as LocalAdaptiveLoss
from .loss import adaptive_weights as local_adaptive_weights
from .mask import SaliencyMask

__all__ = [
    "is_dtensor",
    "is_sharded",
    "shard_like",
    "norm_reduce_group",
    "norm_share",
    "all_reduce_norm_states",
    "all_reduce_fisher",
    "sharded_saliency_mask",
    "adaptive_weights",
    "adaptive_cross_entropy",
    "AdaptiveLoss",
    "prepare_checkpoint_load",
]


# --------------------------------------------------------------------------- Fisher and saliency
def all_reduce_fisher(optimizer, which=("forget", "remain"), *, average: bool = True, group=None) -> int:
    """Average (or sum) the accumulated Fisher of an SFRon optimizer over the ranks of ``group``.

    For DDP runs that accumulate the Fisher on per-rank gradients (under
    ``model.no_sync()``): afterwards every rank holds the same Fisher and so
    builds the same mask. Sharded (DTensor) Fisher states are left alone: their
    gradients were already reduced. All tensors go in one collective.
    Returns how many Fisher tensors were reduced.
    """
    which = (which,) if isinstance(which, str) else tuple(which)
    for w in which:
        if w not in FISHER_KEYS:
            raise ValueError(f"Invalid which: {w!r}; expected 'forget' or 'remain'")
    tensors = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            state = optimizer.state.get(p, {})
            for w in which:
                f = state.get(FISHER_KEYS[w])
                if f is not None and not is_dtensor(f):
                    tensors.append(f)
    if not tensors:
        return 0
    by_device = {}
    for f in tensors:
        by_device.setdefault(f.device, []).append(f)
    world = dist.get_world_size(group)
    for fishers in by_device.values():
        flat = torch.cat([f.reshape(-1) for f in fishers])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat /= world
        offset = 0
        for f in fishers:
            f.copy_(flat[offset:offset + f.numel()].view_as(f))
            offset += f.numel()
    return len(tensors)


def _gather_1d(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's 1-D ``local`` (lengths may differ), concatenated in rank order, on the CPU of every rank."""
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, local.numel(), group=group)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n].cpu() for part, n in zip(parts, sizes)])


def _global_index(t, offset: int):
    """Maps local flat positions of ``t`` (a DTensor's local block, or a plain tensor) to flat indices
    in the global order: ``offset`` plus the row-major index in ``t``'s global shape."""
    if not is_dtensor(t) or t.dim() == 0:
        return lambda pos: pos + offset
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, start = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    strides = torch.ones(t.dim(), dtype=torch.int64)
    for d in range(t.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * t.shape[d + 1]

    def index(pos):
        coords = torch.stack(torch.unravel_index(pos.cpu(), tuple(local_shape)), dim=1) + torch.tensor(start)
        return (coords * strides).sum(dim=1).to(pos.device) + offset

    return index


@torch.no_grad()
def sharded_saliency_mask(params, forget_fishers, remain_fishers, gamma: float = 1.0, density: float | None = None,
                          *, dtype: torch.dtype = torch.bool, impl=None) -> SaliencyMask:
    """:func:`sfron_ops.saliency_mask` for lists that hold DTensors (FSDP2): each rank computes its shards.

    The masks come back as DTensors placed like their parameters (plain tensors
    stay plain). ``kept`` and ``total`` count the global tensors, each element once.
    With ``density`` the masks are exactly those of one process on the full tensors:
    the cut-off comes from every rank's ratios, and ties at it are kept by their
    flat index over the global tensors in order, lowest first.
    """
    from . import functional as F
    from .mask import check_density, density_count, density_cutoff, keep_top
    from .reference import saliency_ratio

    group = norm_reduce_group([params]) or (dist.group.WORLD if dist.is_initialized() else None)
    if group is None:
        raise RuntimeError("sharded_saliency_mask needs an initialised torch.distributed process group")
    if dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"Invalid dtype: {dtype}; expected torch.bool or torch.uint8")
    if density is not None:
        check_density(density)

    def local(t):
        return t.to_local() if is_dtensor(t) else t

    forget = [local(f).to(torch.float32) for f in forget_fishers]
    remain = [local(r).to(torch.float32) for r in remain_fishers]
    counted = [counts_here(p, group) for p in params]
    total = sum(p.numel() for p in params)
    if density is not None:
        ratios = [saliency_ratio(f, r) for f, r in zip(forget, remain)]
        mine = [r.reshape(-1).cpu() for r, c in zip(ratios, counted) if c]
        cutoff, ties = density_cutoff(_gather_1d(torch.cat(mine) if mine else torch.empty(0), group),
                                      density_count(density, total))
        offsets = [0]
        for p in params[:-1]:
            offsets.append(offsets[-1] + p.numel())
        index_of = [_global_index(p, o) for p, o in zip(params, offsets)]
        # the lowest `ties` global indices among the elements equal to the cut-off, over every rank
        tied = [index_of[i]((r == cutoff).view(-1).nonzero().view(-1)).cpu()
                for i, (r, c) in enumerate(zip(ratios, counted)) if c and ties]
        tied = torch.cat(tied).sort().values[:ties] if tied else torch.empty(0, dtype=torch.int64)
        last_tie = int(_gather_1d(tied, group).sort().values[ties - 1]) if ties else -1
        local_masks = [keep_top(r, cutoff, last_tie, index_of[i]).to(dtype) for i, r in enumerate(ratios)]
        kept = sum(int(m.count_nonzero()) for m, c in zip(local_masks, counted) if c)
    else:
        local_masks = [torch.empty(f.shape, dtype=dtype, device=f.device) for f in forget]
        counted_idx = [i for i, c in enumerate(counted) if c]
        other_idx = [i for i, c in enumerate(counted) if not c]
        kept = 0
        for idx, counts in ((counted_idx, True), (other_idx, False)):
            if idx:
                n = F.saliency_mask_([forget[i] for i in idx], [remain[i] for i in idx],
                                     [local_masks[i] for i in idx], gamma=gamma, impl=impl)
                kept += n if counts else 0
    kept_t = torch.tensor([kept], dtype=torch.int64,
                          device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(kept_t, group=group)
    masks = [wrap_like(m, p) for m, p in zip(local_masks, params)]
    return SaliencyMask(masks, int(kept_t), total)


# --------------------------------------------------------------------------- forget loss
def adaptive_weights(losses: torch.Tensor, lambd: float = 0.5, loss_floor: float | None = LOSS_FLOOR,
                     group=None, *, eps: float = WEIGHT_EPS) -> torch.Tensor:
    r""":func:`sfron_ops.adaptive_weights` normalised over the global batch of a data-parallel step.

    The :math:`c_i` are :func:`sfron_ops.adaptive_weights`' (same ``lambd``, ``loss_floor`` and ``eps``);
    :math:`w_i = N c_i / \sum_j c_j` with :math:`N` and :math:`\sum_j c_j` over every rank's
    samples (one all-reduce of two numbers). With equal per-rank batches, DDP's gradient averaging
    of ``mean_i(w_i * loss_i)`` then gives the single-process gradient of the global batch. Without
    an initialised process group it is the local rule.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return local_adaptive_weights(losses, lambd, loss_floor, eps=eps)
    c = inverse_loss_powers(losses, lambd, loss_floor, eps=eps)
    stats = torch.stack([c.sum(), torch.tensor(float(c.numel()), device=c.device)])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return normalise_weights(c, stats[1], stats[0], losses.dtype)


class AdaptiveLoss(LocalAdaptiveLoss):
    """:class:`sfron_ops.AdaptiveLoss` with weights normalised over the global batch (see :func:`adaptive_weights`)."""

    def __init__(self, loss_fn=None, lambd: float = 0.5, loss_floor: float | None = LOSS_FLOOR, group=None):
        super().__init__(loss_fn, lambd, loss_floor)
        self.group = group

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return adaptive_weights(losses, self.lambd, self.loss_floor, self.group)


def adaptive_cross_entropy(output: torch.Tensor, target: torch.Tensor, lambd: float = 0.5,
                           loss_floor: float | None = LOSS_FLOOR, group=None) -> torch.Tensor:
    """The adaptive forget loss with cross-entropy, weights normalised over the global batch."""
    return AdaptiveLoss(None, lambd, loss_floor, group)(output, target)


# --------------------------------------------------------------------------- checkpoints
def prepare_checkpoint_load(model, optimizer, checkpoint_id=None, *, storage_reader=None, key: str = "optim") -> int:
    """Allocate the optimizer state that a ``torch.distributed.checkpoint`` holds and ``optimizer`` lacks.

    ``dcp.load`` fills a state dict in place and skips entries it does not
    have; a fresh SFRon has no masks, Fisher or slow weights until it computes
    them. Call this before ``get_optimizer_state_dict(model, optimizer)`` on the
    loading side; ``key`` is where the optimizer state dict sits in the saved
    dict. Entries shaped like their parameter are allocated like it (DTensors
    with its placements under FSDP2); others as plain tensors of the saved size.
    Returns how many entries were allocated.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if storage_reader is None:
        if checkpoint_id is None:
            raise ValueError("pass checkpoint_id or storage_reader")
        storage_reader = dcp.FileSystemReader(checkpoint_id)
    saved = storage_reader.read_metadata().state_dict_metadata
    # DCP's own initialisation runs first, so the loading side's entries and FQNs are the saving side's
    fqns = [f for g in get_optimizer_state_dict(model, optimizer)["param_groups"] for f in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(fqns) != len(params):
        raise RuntimeError(f"{len(fqns)} parameter names for {len(params)} optimizer parameters")
    allocated = 0
    for fqn, p in zip(fqns, params):
        prefix = f"{key}.state.{fqn}."
        for name, meta in saved.items():
            entry = name[len(prefix):] if name.startswith(prefix) else None
            if not entry or "." in entry or entry in optimizer.state[p] or not isinstance(meta,
                                                                                           TensorStorageMetadata):
                continue
            dtype = meta.properties.dtype
            if entry == "packed_mask":
                from .packing import pack_like

                packed = pack_like(torch.zeros(p.shape, dtype=torch.bool, device=p.device), p)
                if tuple(packed.shape) != tuple(meta.size):
                    raise ValueError(f"the packed mask of {fqn!r} was saved with {tuple(meta.size)[0]} bytes but "
                                     f"this layout holds {packed.shape[0]}: packed masks of sharded parameters "
                                     "reload only at the mesh shape they were saved with")
                optimizer.state[p][entry] = packed
            elif tuple(meta.size) == tuple(p.shape):
                optimizer.state[p][entry] = torch.zeros_like(p, dtype=dtype)
            else:
                local = p.to_local() if is_dtensor(p) else p
                optimizer.state[p][entry] = torch.zeros(tuple(meta.size), dtype=dtype, device=local.device)
            allocated += 1
    return allocated
