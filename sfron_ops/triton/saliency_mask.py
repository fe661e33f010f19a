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
from torch.library import wrap_triton

from .. import _ops
from . import _common as tc


@tc.device_function
def _mask_chunk(ff_ptr, fr_ptr, m_ptr, start, numel, eps, gamma, EVEN: tl.constexpr, BLOCK: tl.constexpr,
                CHUNK: tl.constexpr):
    count = tl.zeros([BLOCK], tl.int32)
    for i in range(0, tc.chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        ratio = tl.math.div_rn(tc.load_f32(ff_ptr, offs, numel, EVEN) + eps,
                               tc.load_f32(fr_ptr, offs, numel, EVEN) + eps)
        keep = ratio >= gamma
        if not EVEN:
            keep = keep & (offs < numel)
        tc.store(m_ptr, offs, keep, numel, EVEN)
        count += keep.to(tl.int32)
    return tl.sum(count, axis=0)


@triton.jit(do_not_specialize=["num_chunks"])
def _saliency_mask_kernel(table, num_chunks, forget_fishers, remain_fishers, masks, numel, kept, eps, gamma,
                          TABLE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # row: forget, remain, masks, numel
    row, start, n = tc.program_chunk(table if TABLE else None, num_chunks, numel, 4, CHUNK, TABLE)
    ff_ptr = tc.tensor_at(row, 0, forget_fishers, ALIGNED, TABLE)
    fr_ptr = tc.tensor_at(row, 1, remain_fishers, ALIGNED, TABLE)
    m_ptr = tc.tensor_at(row, 2, masks, ALIGNED, TABLE)
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
        tc.launch(wrap_triton(_saliency_mask_kernel) if trace else _saliency_mask_kernel, call.grid,
                  (call.table, call.num_chunks, *witnesses, call.numel, state[0], float(_ops.RATIO_EPS),
                   float(gamma)),
                  trace=trace, TABLE=call.table_mode, ALIGNED=call.aligned, BLOCK=tc.BLOCK, CHUNK=tc.CHUNK)

    # bool masks are written as the bytes 0 and 1 (through uint8 pointers)
    tc.execute("saliency_mask", [forget_fishers, remain_fishers, masks], 3, tc.CHUNK, check=check, issue=issue,
               state=[(kept, True)], mutated=(2,))


saliency_mask_, saliency_mask_triton_ = tc.op_entry("saliency_mask", _saliency_mask, {"masks", "kept"})
