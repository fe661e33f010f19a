r"""slow_sync_: the slow weights move toward the fast ones, and the fast ones optionally reset, one pass.

.. math::
   \phi \leftarrow \phi + a(\theta - \phi) \ (a < 0.5), \quad
   \phi \leftarrow \theta - (\theta - \phi)(1 - a) \ (a \ge 0.5), \qquad
   \theta \leftarrow \phi \text{ if reset\_fast}

The two-sided form is torch.lerp's: exact at a = 0 and at a = 1. The side is
chosen on the host from the float64 ``a``, and ``1 - a`` is rounded from
float64, as the reference computes them.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _ops
from . import _common as tc


@tc.device_function
def _sync_chunk(s_ptr, p_ptr, start, numel, alpha, one_minus_alpha, low_side, reset_fast, EVEN: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, tc.chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        slow = tc.load_f32(s_ptr, offs, numel, EVEN)
        fast = tc.load_f32(p_ptr, offs, numel, EVEN)
        diff = fast - slow
        new = tl.where(low_side != 0, slow + alpha * diff, fast - diff * one_minus_alpha)
        # the fast weights get the slow value as stored, rounded once
        new = tc.round_to(new, s_ptr.dtype.element_ty)
        tc.store(s_ptr, offs, new, numel, EVEN)
        if reset_fast != 0:
            tc.store(p_ptr, offs, new, numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks", "low_side", "reset_fast", "period"])
def _slow_sync_kernel(table, num_chunks, slow_params, params, numel, alpha, one_minus_alpha, low_side, reset_fast,
                      norm_state, count, period, arrivals, TABLE: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_COUNT: tl.constexpr,
                      FINAL: tl.constexpr):
    due = True
    if HAS_NORM:
        due = tl.load(norm_state + 1) <= 0
    if HAS_COUNT:
        # every program decides from the count before the call; the last one of the last launch moves it on
        counted = tl.load(count) + 1.0
        reached = counted >= period
        due = due & reached
    if due:
        # row: slow_params, params, numel
        row, start, n = tc.program_chunk(table if TABLE else None, num_chunks, numel, 3, CHUNK, TABLE)
        s_ptr = tc.tensor_at(row, 0, slow_params, ALIGNED, TABLE)
        p_ptr = tc.tensor_at(row, 1, params, ALIGNED, TABLE)
        if start + CHUNK <= n:
            _sync_chunk(s_ptr, p_ptr, start, n, alpha, one_minus_alpha, low_side, reset_fast, True, BLOCK, CHUNK)
        else:
            _sync_chunk(s_ptr, p_ptr, start, n, alpha, one_minus_alpha, low_side, reset_fast, False, BLOCK, CHUNK)
    if HAS_COUNT and FINAL:
        if tc.arrive(arrivals):
            skipped = False
            if HAS_NORM:
                skipped = tl.load(norm_state + 1) > 0
            if not skipped:
                tl.store(count, tl.where(reached, 0.0, counted))
            tl.store(arrivals, 0)


def _slow_sync(slow_params: list[torch.Tensor], params: list[torch.Tensor], norm_state: Optional[torch.Tensor] = None,
               counter: Optional[torch.Tensor] = None, *, alpha: float, reset_fast: bool, period: int = 1) -> None:
    def check():
        _ops.check_slow_sync(slow_params, params, alpha=alpha, reset_fast=reset_fast, norm_state=norm_state,
                             counter=counter, period=period)

    def issue(call, witnesses, state, trace):
        arrivals, _ = tc.workspace(call.device, 0, trace)
        tc.launch(wrap_triton(_slow_sync_kernel) if trace else _slow_sync_kernel, call.grid,
                  (call.table, call.num_chunks, *witnesses, call.numel, float(alpha), float(1 - alpha),
                   int(alpha < 0.5), int(reset_fast), tc.optional_arg(state[0], call.device),
                   tc.optional_arg(state[1], call.device), float(period), arrivals),
                  trace=trace, TABLE=call.table_mode, ALIGNED=call.aligned, BLOCK=tc.BLOCK, CHUNK=tc.CHUNK,
                  HAS_NORM=state[0] is not None, HAS_COUNT=state[1] is not None, FINAL=call.final)

    tc.execute("slow_sync", [slow_params, params], 2, tc.CHUNK, check=check, issue=issue,
               state=[(norm_state, False), (counter, True)], mutated=(0, 1) if reset_fast else (0,))


slow_sync_, slow_sync_triton_ = tc.op_entry("slow_sync", _slow_sync, {"slow_params", "params", "counter"})
