r"""fisher_accumulate_: the diagonal Fisher of one batch added to float32 accumulators, one pass.

.. math::
   F \leftarrow F + s\, g^2 \qquad (F \text{ float32, any floating } g)
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _ops
from . import _common as tc


@tc.device_function
def _fisher_chunk(f_ptr, g_ptr, start, numel, scale, EVEN: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, tc.chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        g = tc.load_f32(g_ptr, offs, numel, EVEN)
        tc.store(f_ptr, offs, tc.load_f32(f_ptr, offs, numel, EVEN) + scale * (g * g), numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks"])
def _fisher_accumulate_kernel(table, num_chunks, fishers, grads, numel, scale, TABLE: tl.constexpr,
                              ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # row: fishers, grads, numel
    row, start, n = tc.program_chunk(table if TABLE else None, num_chunks, numel, 3, CHUNK, TABLE)
    f_ptr = tc.tensor_at(row, 0, fishers, ALIGNED, TABLE)
    g_ptr = tc.tensor_at(row, 1, grads, ALIGNED, TABLE)
    if start + CHUNK <= n:
        _fisher_chunk(f_ptr, g_ptr, start, n, scale, True, BLOCK, CHUNK)
    else:
        _fisher_chunk(f_ptr, g_ptr, start, n, scale, False, BLOCK, CHUNK)


def _fisher_accumulate(fishers: list[torch.Tensor], grads: list[torch.Tensor], *, scale: float) -> None:
    def check():
        _ops.check_fisher_accumulate(fishers, grads, scale=scale)

    def issue(call, witnesses, state, trace):
        tc.launch(wrap_triton(_fisher_accumulate_kernel) if trace else _fisher_accumulate_kernel, call.grid,
                  (call.table, call.num_chunks, *witnesses, call.numel, float(scale)),
                  trace=trace, TABLE=call.table_mode, ALIGNED=call.aligned, BLOCK=tc.BLOCK, CHUNK=tc.CHUNK)

    tc.execute("fisher_accumulate", [fishers, grads], 2, tc.CHUNK, check=check, issue=issue, mutated=(0,))


fisher_accumulate_, fisher_accumulate_triton_ = tc.op_entry("fisher_accumulate", _fisher_accumulate, {"fishers"})
