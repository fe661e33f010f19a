"""DTensor (FSDP2) helpers: the one place that knows about placements, local shards, global indices and
the collectives over them (the global norm, the saliency mask's counts and cut-off).

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


def placed_group(tensors):
    """The process group of a list that holds DTensors (their mesh's, see :func:`norm_reduce_group`, or the
    world when none is sharded), or ``None`` for a list of plain tensors: one process's work."""
    if not any(is_dtensor(t) for t in tensors):
        return None
    group = norm_reduce_group([tensors]) or (dist.group.WORLD if dist.is_initialized() else None)
    if group is None:
        raise RuntimeError("DTensors need an initialised torch.distributed process group")
    return group


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


# --------------------------------------------------------------------------- data-parallel collectives
def data_parallel_group(group=None):
    """The ranks a batch statistic is summed over: ``group``, else the default group when torch.distributed
    is initialised with more than one rank, else ``None`` (one process)."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_ints(values: list, group) -> list:
    """Python ints summed over the ranks of ``group`` (one collective); ``group=None``: the values themselves."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def gather_1d(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's 1-D ``local`` (lengths may differ), concatenated in rank order, on the CPU of every rank;
    ``group=None``: ``local`` itself."""
    if group is None:
        return local
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, local.numel(), group=group)
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=_collective_device(group))
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n].cpu() for part, n in zip(parts, sizes)])


def global_index(t, offset: int):
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
