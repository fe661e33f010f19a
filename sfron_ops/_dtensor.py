"""DTensor (FSDP2) helpers: the one place that knows about placements, local shards and the global norm.

Every other module reaches DTensors through these functions, so a plain
tensor passes through all of them unchanged and ``torch.distributed`` is
touched only when a DTensor is present.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_DTENSOR = None


def _dtensor_cls():
    global _DTENSOR
    if _DTENSOR is None:
        from torch.distributed.tensor import DTensor

        _DTENSOR = DTensor
    return _DTENSOR


def is_dtensor(t) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor`."""
    return dist.is_available() and isinstance(t, _dtensor_cls())


def placement_kinds(t):
    from torch.distributed.tensor import Replicate, Shard

    kinds = []
    for i, pl in enumerate(t.placements):
        if isinstance(pl, Shard):
            kinds.append("shard")
        elif isinstance(pl, Replicate):
            kinds.append("replicate")
        else:
            raise NotImplementedError(
                f"a tensor placed as {pl} on mesh dimension {i} is not supported: SFR-on needs sharded or "
                "replicated tensors (a Partial gradient must be reduced first)")
    return kinds


def to_local(t):
    """The local shard of a DTensor (it shares the storage under ``no_grad``), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor with at least one ``Shard`` placement."""
    return is_dtensor(t) and "shard" in placement_kinds(t)


# --------------------------------------------------------------------------- masks
def shard_like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` laid out like ``param``: a DTensor with its mesh and placements when ``param`` is one.

    A full (global) mask is cut locally, with no communication, so every rank
    must pass the same full mask; a DTensor mask is redistributed if needed.
    """
    if not is_dtensor(param):
        if is_dtensor(mask):
            raise ValueError(f"mask is a DTensor ({mask.placements}) but its parameter is a plain tensor")
        return mask
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(mask):
        if mask.device_mesh == param.device_mesh and tuple(mask.placements) == tuple(param.placements):
            return mask
        return mask.redistribute(param.device_mesh, param.placements)
    return distribute_tensor(mask, param.device_mesh, param.placements, src_data_rank=None)


def wrap_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not is_dtensor(param):
        return local
    return _dtensor_cls().from_local(local, param.device_mesh, param.placements, run_check=False,
                                     shape=param.shape, stride=param.stride())


# --------------------------------------------------------------------------- global norm
def norm_reduce_group(grads_per_group):
    """The process group over which a step's norm state must be summed, or ``None``.

    ``None`` when torch.distributed is not initialised or no gradient is a
    sharded DTensor (single process, DDP): every rank then holds the whole norm.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    mesh = None
    for grads in grads_per_group:
        for g in grads:
            if is_sharded(g):
                mesh = g.device_mesh
                break
        if mesh is not None:
            break
    if mesh is None:
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise NotImplementedError(
            f"a {mesh.ndim}-D device mesh of {mesh.size()} ranks inside a world of {dist.get_world_size()}: the "
            "global norm is reduced over the whole world, so the mesh must span it")
    return dist.group.WORLD


def counts_here(t, group) -> bool:
    """Whether this rank adds ``t``'s local squares to the global norm (each element exactly once)."""
    if not is_dtensor(t):
        return dist.get_rank(group) == 0  # replicated on every rank: the group's first rank counts it
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(kind == "shard" or c == 0 for kind, c in zip(placement_kinds(t), coordinate))


def norm_share(grads, masks, group):
    """The gradients (and aligned masks) whose squares this rank contributes to the summed norm."""
    keep = [i for i, g in enumerate(grads) if counts_here(g, group)]
    return [grads[i] for i in keep], [masks[i] for i in keep]


def all_reduce_norm_states(norm_states: dict, group) -> None:
    """Sum ``[sum of squares, non-finite flag]`` over ``group``; one collective.

    The flag only matters as ``> 0``, so a sum serves as the maximum.
    """
    states = list(norm_states.values())
    if not states:
        return
    dist.all_reduce(states[0], op=dist.ReduceOp.SUM, group=group)
    for s in states[1:]:
        s.copy_(states[0])
