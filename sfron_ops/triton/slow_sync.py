r"""slow_sync_: the slow weights move toward the fast ones, and the fast ones optionally reset, one pass.

.. math::
   \phi \leftarrow \phi + a(\theta - \phi) \ (a < 0.5), \quad
   \phi \leftarrow \theta - (\theta - \phi)(1 - a) \ (a \ge 0.5), \qquad
   \theta \leftarrow \phi \text{ if reset\_fast}

The two-sided form is torch.lerp's: exact at a = 0 and at a = 1. The side is
chosen on the host from the float64 ``a``, and ``1 - a`` is rounded from
float64, as the reference computes them.
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
    round_to,
    store,
)


@device_function
def _sync_chunk(s_ptr, p_ptr, start, numel, alpha, one_minus_alpha, low_side, reset_fast, EVEN: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        slow = load_f32(s_ptr, offs, numel, EVEN)
        fast = load_f32(p_ptr, offs, numel, EVEN)
        diff = fast - slow
        new = tl.where(low_side != 0, slow + alpha * diff, fast - diff * one_minus_alpha)
        # the fast weights get the slow value as stored, rounded once
        new = round_to(new, s_ptr.dtype.element_ty)
        store(s_ptr, offs, new, numel, EVEN)
        if reset_fast != 0:
            store(p_ptr, offs, new, numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks", "low_side", "reset_fast"])
def _slow_sync_kernel(table, num_chunks, slow_params, params, numel, alpha, one_minus_alpha, low_side, reset_fast,
                      TABLE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if TABLE:
        row, start, n = chunk_of(table, num_chunks, 3, CHUNK)  # row: slow_params, params, numel
        s_ptr = column(row, 0, slow_params, ALIGNED)
        p_ptr = column(row, 1, params, ALIGNED)
    else:
        s_ptr, p_ptr = slow_params, params
        start = tl.program_id(0).to(tl.int64) * CHUNK
        n = numel
    if start + CHUNK <= n:
        _sync_chunk(s_ptr, p_ptr, start, n, alpha, one_minus_alpha, low_side, reset_fast, True, BLOCK, CHUNK)
    else:
        _sync_chunk(s_ptr, p_ptr, start, n, alpha, one_minus_alpha, low_side, reset_fast, False, BLOCK, CHUNK)


def _slow_sync(slow_params: list[torch.Tensor], params: list[torch.Tensor], *, alpha: float,
               reset_fast: bool) -> None:
    def check():
        _ops.check_slow_sync(slow_params, params, alpha=alpha, reset_fast=reset_fast)

    def issue(call, witnesses, state, trace):
        launch(wrap_triton(_slow_sync_kernel) if trace else _slow_sync_kernel, call.grid,
               (call.table, call.num_chunks, *witnesses, call.numel, float(alpha), float(1 - alpha),
                int(alpha < 0.5), int(reset_fast)),
               trace=trace, TABLE=call.table_mode, ALIGNED=call.aligned, BLOCK=BLOCK, CHUNK=CHUNK)

    execute("slow_sync", [slow_params, params], 2, CHUNK, check=check, issue=issue,
            mutated=(0, 1) if reset_fast else (0,))


slow_sync_triton_ = triton_op("sfron_ops::slow_sync_triton_", _slow_sync, mutates_args={"slow_params", "params"})


def slow_sync_(slow_params: list[torch.Tensor], params: list[torch.Tensor], *, alpha: float, reset_fast: bool) -> None:
    """``sfron_ops::slow_sync_`` in one Triton launch (per dtype); see the module docstring."""
    run = slow_sync_triton_ if torch.compiler.is_compiling() else _slow_sync
    run(slow_params, params, alpha=alpha, reset_fast=reset_fast)
