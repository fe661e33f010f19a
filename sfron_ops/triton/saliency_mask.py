r"""saliency_mask_: the saliency mask from the forget and remain Fisher, and how many elements it keeps.

.. math::
   m = \Big[\frac{F_f + \varepsilon}{F_r + \varepsilon} \ge \gamma\Big], \quad \varepsilon = 10^{-15},
   \qquad \text{kept} \mathrel{+}= \textstyle\sum m

The ratio is an IEEE-rounded float32 division (``div_rn``; Triton's ``/`` is
approximate) compared with ``float32(gamma)``, so a cut-off chosen on the host
from the reference's ratios selects exactly the same elements. The count is
an integer atomic per program, exact in any order.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _ops
from ._common import (
    BLOCK,
    CHUNK,
    chunk_extent,
    chunk_of,
    column,
    device_function,
    execute,
    launch,
    load_f32,
    store,
)


@device_function
def _mask_chunk(ff_ptr, fr_ptr, m_ptr, start, numel, eps, gamma, EVEN: tl.constexpr, BLOCK: tl.constexpr,
                CHUNK: tl.constexpr):
    count = tl.zeros([BLOCK], tl.int32)
    for i in range(0, chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        ratio = tl.math.div_rn(load_f32(ff_ptr, offs, numel, EVEN) + eps, load_f32(fr_ptr, offs, numel, EVEN) + eps)
        keep = ratio >= gamma
        if not EVEN:
            keep = keep & (offs < numel)
        store(m_ptr, offs, keep, numel, EVEN)
        count += keep.to(tl.int32)
    return tl.sum(count, axis=0)


@triton.jit(do_not_specialize=["num_chunks"])
def _saliency_mask_kernel(table, num_chunks, forget_fishers, remain_fishers, masks, numel, kept, eps, gamma,
                          TABLE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if TABLE:
        row, start, n = chunk_of(table, num_chunks, 4, CHUNK)  # row: forget, remain, masks, numel
        ff_ptr = column(row, 0, forget_fishers, ALIGNED)
        fr_ptr = column(row, 1, remain_fishers, ALIGNED)
        m_ptr = column(row, 2, masks, ALIGNED)
    else:
        ff_ptr, fr_ptr, m_ptr = forget_fishers, remain_fishers, masks
        start = tl.program_id(0).to(tl.int64) * CHUNK
        n = numel
    if start + CHUNK <= n:
        count = _mask_chunk(ff_ptr, fr_ptr, m_ptr, start, n, eps, gamma, True, BLOCK, CHUNK)
    else:
        count = _mask_chunk(ff_ptr, fr_ptr, m_ptr, start, n, eps, gamma, False, BLOCK, CHUNK)
    tl.atomic_add(kept, count.to(tl.int64), sem="relaxed")


def _saliency_mask(forget_fishers: list[torch.Tensor], remain_fishers: list[torch.Tensor],
                   masks: list[torch.Tensor], kept: torch.Tensor, *, gamma: float) -> None:
    def check():
        _ops.check_saliency_mask(forget_fishers, remain_fishers, masks, kept, gamma=gamma)

    def issue(call, witnesses, state, trace):
        launch(wrap_triton(_saliency_mask_kernel) if trace else _saliency_mask_kernel, call.grid,
               (call.table, call.num_chunks, *witnesses, call.numel, state[0], float(_ops.RATIO_EPS), float(gamma)),
               trace=trace, TABLE=call.table_mode, ALIGNED=call.aligned, BLOCK=BLOCK, CHUNK=CHUNK)

    # bool masks are written as the bytes 0 and 1 (through uint8 pointers)
    execute("saliency_mask", [forget_fishers, remain_fishers, masks], 3, CHUNK, check=check, issue=issue,
            state=[(kept, True)], mutated=(2,))


saliency_mask_triton_ = triton_op("sfron_ops::saliency_mask_triton_", _saliency_mask, mutates_args={"masks", "kept"})


def saliency_mask_(forget_fishers: list[torch.Tensor], remain_fishers: list[torch.Tensor], masks: list[torch.Tensor],
                   kept: torch.Tensor, *, gamma: float) -> None:
    """``sfron_ops::saliency_mask_`` in one Triton launch (per mask dtype); see the module docstring."""
    run = saliency_mask_triton_ if torch.compiler.is_compiling() else _saliency_mask
    run(forget_fishers, remain_fishers, masks, kept, gamma=gamma)
