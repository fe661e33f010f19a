r"""SFR-on on ``torch.distributed``: DDP and FSDP2 (``fully_shard``, DTensor parameters).

What has to agree across ranks, and how it does:

* **Gradients.** DDP all-reduces them (every rank holds the mean gradient of the
  global batch); FSDP2 reduce-scatters them (every rank holds its shard of it).
  Either way the optimizer sees the single-process gradient, replicated or sharded.
* **The forget loss.** The per-sample weights :math:`w_i = N c_i / \sum_j c_j`
  normalise over the batch; :func:`sfron_ops.adaptive_weights` (and so
  :class:`~sfron_ops.AdaptiveLoss` and :func:`~sfron_ops.adaptive_cross_entropy`)
  takes ``N`` and :math:`\sum_j c_j` over the global batch when torch.distributed
  is initialised, so the data-parallel loss has the single-process gradient. This
  module re-exports the three under their old names here.
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
  run on the local shards; :func:`sfron_ops.fisher_diagonal` returns DTensors and
  :func:`sfron_ops.saliency_mask` takes them. Under DDP, Fisher accumulated on synchronised
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

from ._dtensor import (
    all_reduce_norm_states,
    is_dtensor,
    is_sharded,
    norm_reduce_group,
    norm_share,
    shard_like,
    to_local,
)
from .fisher import FISHER_KEYS
from .loss import AdaptiveLoss, adaptive_cross_entropy, adaptive_weights

__all__ = [
    "is_dtensor",
    "is_sharded",
    "shard_like",
    "norm_reduce_group",
    "norm_share",
    "all_reduce_norm_states",
    "all_reduce_fisher",
    "prepare_checkpoint_load",
    # the forget loss normalises over the global batch by itself; these are the same objects as sfron_ops'
    "adaptive_weights",
    "adaptive_cross_entropy",
    "AdaptiveLoss",
]


# --------------------------------------------------------------------------- Fisher
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
                optimizer.state[p][entry] = torch.zeros(tuple(meta.size), dtype=dtype, device=to_local(p).device)
            allocated += 1
    return allocated
