r"""masked_sq_norm_: the squared norm of the direction and its non-finite flag, in one pass.

.. math::
   \text{norm\_state}[0] \mathrel{+}= \sum_i \big((g_i m_i)\,\alpha\big)^2, \qquad
   \text{norm\_state}[1] \leftarrow \max\big(\text{norm\_state}[1],\ [\exists i: (g_i m_i)\alpha \notin \mathbb{R}]\big)

Each program writes the sum of squares and the flag of its chunk to a
workspace; the last program adds them in program order (Note [last program]
in :mod:`._common`), so the result is the same on every run.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _ops
from . import _common as tc


@tc.device_function
def _norm_of_chunk(g_ptr, m_ptr, start, numel, alpha, MASK_KIND: tl.constexpr, EVEN: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """(sum of u^2, any u not finite) over one chunk, u = (g * m) * alpha."""
    sq = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for i in range(0, tc.chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        u = tc.direction(tc.load_f32(g_ptr, offs, numel, EVEN), tc.load_mask(m_ptr, offs, numel, MASK_KIND, EVEN),
                         alpha, MASK_KIND)
        if not EVEN:
            u = tl.where(offs < numel, u, 0.0)  # alpha may be infinite: 0 * inf must not count
        sq += u * u
        bad = tl.maximum(bad, (~(tl.abs(u) <= tc.FLT_MAX)).to(tl.int32))
    return tl.sum(sq, axis=0), tl.max(bad, axis=0)


@triton.jit(do_not_specialize=["num_chunks"])
def _masked_norm_kernel(table, num_chunks, grads, masks, numel, norm_state, partials, counter, alpha, alpha_tensor,
                        TABLE: tl.constexpr, MASK_KIND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                        CHUNK: tl.constexpr, REDUCE_BLOCK: tl.constexpr, HAS_ALPHA_TENSOR: tl.constexpr):
    pid = tl.program_id(0)
    alpha = tc.times_tensor(alpha, alpha_tensor, HAS_ALPHA_TENSOR)
    # row: grads, masks, numel
    row, start, n = tc.program_chunk(table if TABLE else None, num_chunks, numel, 3, CHUNK, TABLE)
    g_ptr = tc.tensor_at(row, 0, grads, ALIGNED, TABLE)
    m_ptr = tc.tensor_at(row, 1, masks, ALIGNED, TABLE)
    if start + CHUNK <= n:
        sq, bad = _norm_of_chunk(g_ptr, m_ptr, start, n, alpha, MASK_KIND, True, BLOCK, CHUNK)
    else:
        sq, bad = _norm_of_chunk(g_ptr, m_ptr, start, n, alpha, MASK_KIND, False, BLOCK, CHUNK)
    programs = tl.num_programs(0)
    tl.store(partials + pid, sq)
    tl.store(partials + programs + pid, bad.to(tl.float32))
    if tc.arrive(counter):
        total = tl.zeros([REDUCE_BLOCK], tl.float32)
        flag = tl.zeros([REDUCE_BLOCK], tl.float32)
        for first in range(0, programs, REDUCE_BLOCK):
            idx = first + tl.arange(0, REDUCE_BLOCK)
            valid = idx < programs
            # volatile: the other programs' partials, past this SM's L1
            total += tl.load(partials + idx, mask=valid, other=0.0, volatile=True)
            flag = tl.maximum(flag, tl.load(partials + programs + idx, mask=valid, other=0.0, volatile=True))
        tl.store(norm_state, tl.load(norm_state) + tl.sum(total, axis=0))
        tl.store(norm_state + 1, tl.maximum(tl.load(norm_state + 1), tl.max(flag, axis=0)))
        tl.store(counter, 0)


def _masked_sq_norm(grads: list[torch.Tensor], masks: list[torch.Tensor], norm_state: torch.Tensor,
                    alpha_tensor: Optional[torch.Tensor] = None, *, alpha: float, packed_masks: bool = False) -> None:
    kind = tc.mask_kind(masks, packed_masks)

    def check():
        _ops.check_masked_sq_norm(grads, masks, norm_state, alpha=alpha, packed_masks=packed_masks,
                                  alpha_tensor=alpha_tensor)

    def issue(call, witnesses, state, trace):
        counter, partials = tc.workspace(call.device, 2 * call.grid, trace)
        tc.launch(wrap_triton(_masked_norm_kernel) if trace else _masked_norm_kernel, call.grid,
                  (call.table, call.num_chunks, *witnesses, call.numel, state[0], partials, counter, float(alpha),
                   tc.optional_arg(state[1], call.device)),
                  trace=trace, TABLE=call.table_mode, MASK_KIND=kind, ALIGNED=call.aligned, BLOCK=tc.BLOCK,
                  CHUNK=tc.NORM_CHUNK, REDUCE_BLOCK=tc.REDUCE_BLOCK, HAS_ALPHA_TENSOR=state[1] is not None)

    tc.execute("masked_norm", [grads, masks or None], 2, tc.NORM_CHUNK, check=check, issue=issue, flags=(kind,),
               state=[(norm_state, True), (alpha_tensor, False)], masks_at=1, packed_masks=packed_masks)


masked_sq_norm_, masked_sq_norm_triton_ = tc.op_entry("masked_norm", _masked_sq_norm, {"norm_state"})
