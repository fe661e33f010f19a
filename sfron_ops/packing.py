"""Bit-packed saliency masks: one bit per weight instead of one byte (``SFRon(..., mask_format="packed")``).

The layout is the op schemas' (:mod:`sfron_ops._ops`): a contiguous uint8 tensor of
``ceil(numel / 8)`` bytes, element ``i`` in bit ``i % 8`` (least significant first)
of byte ``i // 8``, over the tensor's elements in row-major order. Every backend
reads it directly (``packed_masks=True``), so the saving is in optimizer state and
in the bytes a step reads.

Under FSDP2 each rank packs its own shard. To stay a checkpointable DTensor the
packed mask is padded to the largest shard's byte count and sharded along its only
dimension on the mesh dimensions that shard the parameter: rank ``r`` holds its
shard's bits in the first bytes of its chunk. Such a checkpoint reloads at the same
mesh shape.
"""

from __future__ import annotations

import math

import torch

from ._dtensor import is_dtensor, shard_like, to_local, wrap_like
from .reference import pack_mask, unpack_mask

FORMATS = ("dense", "packed")


def packed_bytes(numel: int) -> int:
    return (numel + 7) // 8


def _padded_bytes(param) -> int:
    """Bytes of the largest shard of a DTensor parameter (torch.chunk sizes along each sharded dimension)."""
    from torch.distributed.tensor import Shard

    shape = list(param.shape)
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            shape[placement.dim] = math.ceil(shape[placement.dim] / param.device_mesh.size(mesh_dim))
    return packed_bytes(math.prod(shape))


def pack_like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The packed form of a dense binary ``mask`` placed like ``param`` (see the module notes for DTensors)."""
    if not is_dtensor(param):
        return pack_mask(mask)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local = pack_mask(to_local(shard_like(mask, param)))
    capacity = _padded_bytes(param)
    padded = torch.zeros(capacity, dtype=torch.uint8, device=local.device)
    padded[: local.numel()] = local
    placements = [Shard(0) if isinstance(pl, Shard) else Replicate() for pl in param.placements]
    shards = math.prod(param.device_mesh.size(i) for i, pl in enumerate(param.placements) if isinstance(pl, Shard))
    return DTensor.from_local(padded, param.device_mesh, placements, run_check=False, shape=(capacity * shards,),
                              stride=(1,))


def kernel_view(packed: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The bytes the kernels read for ``param``'s (local) elements: a contiguous prefix of the stored mask."""
    if not is_dtensor(param):
        return packed
    return to_local(packed)[: packed_bytes(to_local(param).numel())]


def unpack_like(packed: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The bool mask shaped (and placed) like ``param``."""
    dense = unpack_mask(kernel_view(packed, param), to_local(param))
    return wrap_like(dense, param)


def mask_bytes(masks) -> int:
    """Bytes held by a list of masks (local shards for DTensors); ``None`` entries count zero."""
    return sum(to_local(m).numel() * to_local(m).element_size() for m in masks if m is not None)


# --------------------------------------------------------------------------- masks in optimizer state
# A parameter's state holds one of "mask" (as given) or "packed_mask" (one bit per element).


def store(state: dict, param, mask, mask_format: str) -> None:
    """Keep ``mask`` as ``param``'s mask in its optimizer ``state``, in ``mask_format``."""
    state.pop("mask", None)
    state.pop("packed_mask", None)
    if mask_format == "packed":
        state["packed_mask"] = pack_like(mask, param)
    else:
        state["mask"] = mask


def store_all(state, assigned, mask_format: str) -> None:
    """:func:`store` for every ``(param, label, mask)`` of ``assigned`` (``state``: the optimizer's), after
    checking that each can be kept in ``mask_format`` (a refusal stores none)."""
    if mask_format == "packed":
        for _, label, m in assigned:
            if m.is_floating_point():
                raise ValueError(f"mask for parameter {label} is floating point (soft saliency); "
                                 "mask_format='packed' stores binary masks only")
    for p, _, m in assigned:
        store(state[p], p, m, mask_format)


def dense(state: dict, param):
    """``param``'s mask as it reads (packed ones unpacked to bool), or ``None``."""
    packed = state.get("packed_mask")
    return state.get("mask") if packed is None else unpack_like(packed, param)


def for_kernels(state: dict, param):
    """``param``'s mask as the kernels take it (packed bytes for its local elements), or ``None``."""
    packed = state.get("packed_mask")
    return state.get("mask") if packed is None else kernel_view(packed, param)

