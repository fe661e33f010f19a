r"""sgd_update_: torch.optim.SGD's rule with the SFR-on direction in place of the gradient, one pass.

.. math::
   u &= (g \odot m)\, c, \quad
   c = \text{scale} \cdot \min\!\big(1, \tfrac{\text{max\_norm}}{\sqrt{\text{norm\_state}[0]} + 10^{-6}}\big)
   \text{ (the min only when max\_norm > 0)}\\
   d &= u + \lambda_w \theta; \quad
   b \leftarrow d \text{ if step} = 0 \text{ else } \mu b + (1 - \tau) d; \quad
   d \leftarrow d + \mu b \text{ if nesterov else } b; \quad
   \theta \leftarrow \theta - \eta d; \quad \text{step} \leftarrow \text{step} + 1

Nothing is written when ``norm_state[1] > 0`` (a non-finite direction). The
step counters are advanced by the last program (Note [last program] in
:mod:`._common`), after every program has read them.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _ops
from . import _common as tc


@tc.device_function
def _sgd_chunk(p_ptr, g_ptr, m_ptr, b_ptr, start, numel, coef, first_step, lr, momentum, one_minus_dampening,
               weight_decay, nesterov, MASK_KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, EVEN: tl.constexpr,
               BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, tc.chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        p = tc.load_f32(p_ptr, offs, numel, EVEN)
        d = tc.direction(tc.load_f32(g_ptr, offs, numel, EVEN), tc.load_mask(m_ptr, offs, numel, MASK_KIND, EVEN),
                         coef, MASK_KIND)
        # a runtime choice, not d + 0 * p: that would turn an infinite parameter into NaN
        d = tl.where(weight_decay != 0, d + weight_decay * p, d)
        if HAS_MOMENTUM:
            buf = tl.where(first_step, d,
                           momentum * tc.load_f32(b_ptr, offs, numel, EVEN) + one_minus_dampening * d)
            tc.store(b_ptr, offs, buf, numel, EVEN)
            d = tl.where(nesterov != 0, d + momentum * buf, buf)
        tc.store(p_ptr, offs, p - lr * d, numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks", "num_tensors", "nesterov"])
def _sgd_update_kernel(table, num_chunks, num_tensors, params, grads, masks, momentum_buffers, steps, numel,
                       norm_state, counter, lr, scale, momentum, one_minus_dampening, weight_decay, nesterov,
                       max_norm, lr_tensor, scale_tensor, TABLE: tl.constexpr, MASK_KIND: tl.constexpr,
                       HAS_MOMENTUM: tl.constexpr, HAS_NORM: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNK: tl.constexpr, STEP_BLOCK: tl.constexpr,
                       HAS_LR_TENSOR: tl.constexpr, HAS_SCALE_TENSOR: tl.constexpr):
    coef, skip = tc.clip_and_skip(norm_state, tc.times_tensor(scale, scale_tensor, HAS_SCALE_TENSOR), max_norm,
                                  HAS_NORM)
    lr = tc.times_tensor(lr, lr_tensor, HAS_LR_TENSOR)
    if not skip:
        # row: params, grads, masks, momentum_buffers, steps, numel
        row, start, n = tc.program_chunk(table if TABLE else None, num_chunks, numel, 6, CHUNK, TABLE)
        p_ptr = tc.tensor_at(row, 0, params, ALIGNED, TABLE)
        g_ptr = tc.tensor_at(row, 1, grads, ALIGNED, TABLE)
        m_ptr = tc.tensor_at(row, 2, masks, ALIGNED, TABLE)
        b_ptr = tc.tensor_at(row, 3, momentum_buffers, ALIGNED, TABLE)
        first_step = tl.load(tc.tensor_at(row, 4, steps, False, TABLE)) == 0
        if start + CHUNK <= n:
            _sgd_chunk(p_ptr, g_ptr, m_ptr, b_ptr, start, n, coef, first_step, lr, momentum, one_minus_dampening,
                       weight_decay, nesterov, MASK_KIND, HAS_MOMENTUM, True, BLOCK, CHUNK)
        else:
            _sgd_chunk(p_ptr, g_ptr, m_ptr, b_ptr, start, n, coef, first_step, lr, momentum, one_minus_dampening,
                       weight_decay, nesterov, MASK_KIND, HAS_MOMENTUM, False, BLOCK, CHUNK)
        if tc.arrive(counter):
            tc.advance_steps(table, num_chunks, num_tensors, steps, 6, 4, TABLE, STEP_BLOCK)
            tl.store(counter, 0)


def _sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor],
                momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], norm_state: Optional[torch.Tensor],
                lr_tensor: Optional[torch.Tensor] = None, scale_tensor: Optional[torch.Tensor] = None, *, lr: float,
                scale: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                max_norm: float, packed_masks: bool = False) -> None:
    has_momentum = momentum != 0
    kind = tc.mask_kind(masks, packed_masks)

    def check():
        _ops.check_sgd_update(params, grads, masks, momentum_buffers, steps, norm_state, lr=lr, scale=scale,
                              momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                              max_norm=max_norm, packed_masks=packed_masks, lr_tensor=lr_tensor,
                              scale_tensor=scale_tensor)

    def issue(call, witnesses, state, trace):
        counter, _ = tc.workspace(call.device, 0, trace)
        tc.launch(wrap_triton(_sgd_update_kernel) if trace else _sgd_update_kernel, call.grid,
                  (call.table, call.num_chunks, call.num_tensors, *witnesses, call.numel,
                   tc.optional_arg(state[0], call.device), counter, float(lr), float(scale), float(momentum),
                   float(1 - dampening), float(weight_decay), int(nesterov), float(max_norm),
                   tc.optional_arg(state[1], call.device), tc.optional_arg(state[2], call.device)),
                  trace=trace, TABLE=call.table_mode, MASK_KIND=kind, HAS_MOMENTUM=has_momentum,
                  HAS_NORM=state[0] is not None, ALIGNED=call.aligned, BLOCK=tc.BLOCK, CHUNK=tc.CHUNK,
                  STEP_BLOCK=tc.STEP_BLOCK, HAS_LR_TENSOR=state[1] is not None,
                  HAS_SCALE_TENSOR=state[2] is not None)

    columns = [params, grads, masks or None, momentum_buffers if has_momentum else None, steps]
    tc.execute("sgd_update", columns, 4, tc.CHUNK, check=check, issue=issue, flags=(kind, has_momentum),
               state=[(norm_state, False), (lr_tensor, False), (scale_tensor, False)], mutated=(0, 3), masks_at=2,
               packed_masks=packed_masks)


sgd_update_, sgd_update_triton_ = tc.op_entry("sgd_update", _sgd_update, {"params", "momentum_buffers", "steps"})
