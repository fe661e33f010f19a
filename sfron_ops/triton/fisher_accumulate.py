r"""fisher_accumulate_: the diagonal Fisher of one batch added to float32 accumulators, one pass.

.. math::
   F \leftarrow F + s\, g^2 \qquad (F \text{ float32, any floating } g)
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
def _fisher_chunk(f_ptr, g_ptr, start, numel, scale, EVEN: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        g = load_f32(g_ptr, offs, numel, EVEN)
        store(f_ptr, offs, load_f32(f_ptr, offs, numel, EVEN) + scale * (g * g), numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks"])
def _fisher_accumulate_kernel(table, num_chunks, fishers, grads, numel, scale, TABLE: tl.constexpr,
                              ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if TABLE:
        row, start, n = chunk_of(table, num_chunks, 3, CHUNK)  # row: fishers, grads, numel
        f_ptr = column(row, 0, fishers, ALIGNED)
        g_ptr = column(row, 1, grads, ALIGNED)
    else:
        f_ptr, g_ptr = fishers, grads
        start = tl.program_id(0).to(tl.int64) * CHUNK
        n = numel
    if start + CHUNK <= n:
        _fisher_chunk(f_ptr, g_ptr, start, n, scale, True, BLOCK, CHUNK)
    else:
        _fisher_chunk(f_ptr, g_ptr, start, n, scale, False, BLOCK, CHUNK)


def _fisher_accumulate(fishers: list[torch.Tensor], grads: list[torch.Tensor], *, scale: float) -> None:
    def check():
        _ops.check_fisher_accumulate(fishers, grads, scale=scale)

    def issue(call, witnesses, state, trace):
        launch(wrap_triton(_fisher_accumulate_kernel) if trace else _fisher_accumulate_kernel, call.grid,
               (call.table, call.num_chunks, *witnesses, call.numel, float(scale)),
               trace=trace, TABLE=call.table_mode, ALIGNED=call.aligned, BLOCK=BLOCK, CHUNK=CHUNK)

    execute("fisher_accumulate", [fishers, grads], 2, CHUNK, check=check, issue=issue, mutated=(0,))


fisher_accumulate_triton_ = triton_op("sfron_ops::fisher_accumulate_triton_", _fisher_accumulate,
                                      mutates_args={"fishers"})


def fisher_accumulate_(fishers: list[torch.Tensor], grads: list[torch.Tensor], *, scale: float) -> None:
    """``sfron_ops::fisher_accumulate_`` in one Triton launch (per gradient dtype)."""
    run = fisher_accumulate_triton_ if torch.compiler.is_compiling() else _fisher_accumulate
    run(fishers, grads, scale=scale)
