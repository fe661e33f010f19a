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
from torch.library import triton_op, wrap_triton

from .. import _ops
from ._common import (
    BLOCK,
    CHUNK,
    ELEMENT_MASK,
    NO_MASK,
    PACKED_MASK,
    STEP_BLOCK,
    advance_steps,
    arrive,
    chunk_extent,
    chunk_of,
    clip_and_skip,
    column,
    device_function,
    direction,
    execute,
    launch,
    load_f32,
    load_mask,
    placeholder,
    scalar_arg,
    store,
    times_tensor,
    workspace,
)


@device_function
def _sgd_chunk(p_ptr, g_ptr, m_ptr, b_ptr, start, numel, coef, first_step, lr, momentum, one_minus_dampening,
               weight_decay, nesterov, MASK_KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, EVEN: tl.constexpr,
               BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        p = load_f32(p_ptr, offs, numel, EVEN)
        d = direction(load_f32(g_ptr, offs, numel, EVEN), load_mask(m_ptr, offs, numel, MASK_KIND, EVEN), coef,
                      MASK_KIND)
        # a runtime choice, not d + 0 * p: that would turn an infinite parameter into NaN
        d = tl.where(weight_decay != 0, d + weight_decay * p, d)
        if HAS_MOMENTUM:
            buf = tl.where(first_step, d, momentum * load_f32(b_ptr, offs, numel, EVEN) + one_minus_dampening * d)
            store(b_ptr, offs, buf, numel, EVEN)
            d = tl.where(nesterov != 0, d + momentum * buf, buf)
        store(p_ptr, offs, p - lr * d, numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks", "num_tensors", "nesterov"])
def _sgd_update_kernel(table, num_chunks, num_tensors, params, grads, masks, momentum_buffers, steps, numel,
                       norm_state, counter, lr, scale, momentum, one_minus_dampening, weight_decay, nesterov,
                       max_norm, lr_tensor, scale_tensor, TABLE: tl.constexpr, MASK_KIND: tl.constexpr,
                       HAS_MOMENTUM: tl.constexpr, HAS_NORM: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNK: tl.constexpr, STEP_BLOCK: tl.constexpr,
                       HAS_LR_TENSOR: tl.constexpr, HAS_SCALE_TENSOR: tl.constexpr):
    coef, skip = clip_and_skip(norm_state, times_tensor(scale, scale_tensor, HAS_SCALE_TENSOR), max_norm, HAS_NORM)
    lr = times_tensor(lr, lr_tensor, HAS_LR_TENSOR)
    if not skip:
        if TABLE:
            # row: params, grads, masks, momentum_buffers, steps, numel
            row, start, n = chunk_of(table, num_chunks, 6, CHUNK)
            p_ptr = column(row, 0, params, ALIGNED)
            g_ptr = column(row, 1, grads, ALIGNED)
            m_ptr = column(row, 2, masks, ALIGNED)
            b_ptr = column(row, 3, momentum_buffers, ALIGNED)
            step_ptr = column(row, 4, steps, False)
        else:
            p_ptr, g_ptr, m_ptr, b_ptr, step_ptr = params, grads, masks, momentum_buffers, steps
            start = tl.program_id(0).to(tl.int64) * CHUNK
            n = numel
        first_step = tl.load(step_ptr) == 0
        if start + CHUNK <= n:
            _sgd_chunk(p_ptr, g_ptr, m_ptr, b_ptr, start, n, coef, first_step, lr, momentum, one_minus_dampening,
                       weight_decay, nesterov, MASK_KIND, HAS_MOMENTUM, True, BLOCK, CHUNK)
        else:
            _sgd_chunk(p_ptr, g_ptr, m_ptr, b_ptr, start, n, coef, first_step, lr, momentum, one_minus_dampening,
                       weight_decay, nesterov, MASK_KIND, HAS_MOMENTUM, False, BLOCK, CHUNK)
        if arrive(counter):
            advance_steps(table, num_chunks, num_tensors, steps, 6, 4, TABLE, STEP_BLOCK)
            tl.store(counter, 0)


def _sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor],
                momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], norm_state: Optional[torch.Tensor],
                lr_tensor: Optional[torch.Tensor] = None, scale_tensor: Optional[torch.Tensor] = None, *, lr: float,
                scale: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                max_norm: float, packed_masks: bool = False) -> None:
    has_momentum = momentum != 0
    kind = PACKED_MASK if packed_masks else ELEMENT_MASK if masks else NO_MASK

    def check():
        _ops.check_sgd_update(params, grads, masks, momentum_buffers, steps, norm_state, lr=lr, scale=scale,
                              momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                              max_norm=max_norm, packed_masks=packed_masks, lr_tensor=lr_tensor,
                              scale_tensor=scale_tensor)

    def issue(call, witnesses, state, trace):
        counter, _ = workspace(call.device, 0, trace)
        launch(wrap_triton(_sgd_update_kernel) if trace else _sgd_update_kernel, call.grid,
               (call.table, call.num_chunks, call.num_tensors, *witnesses, call.numel,
                placeholder(call.device) if state[0] is None else state[0], counter, float(lr), float(scale),
                float(momentum), float(1 - dampening), float(weight_decay), int(nesterov), float(max_norm),
                scalar_arg(state[1], call.device), scalar_arg(state[2], call.device)),
               trace=trace, TABLE=call.table_mode, MASK_KIND=kind, HAS_MOMENTUM=has_momentum,
               HAS_NORM=state[0] is not None, ALIGNED=call.aligned, BLOCK=BLOCK, CHUNK=CHUNK, STEP_BLOCK=STEP_BLOCK,
               HAS_LR_TENSOR=state[1] is not None, HAS_SCALE_TENSOR=state[2] is not None)

    columns = [params, grads, masks or None, momentum_buffers if has_momentum else None, steps]
    execute("sgd_update", columns, 4, CHUNK, check=check, issue=issue, flags=(kind, has_momentum),
            state=[(norm_state, False), (lr_tensor, False), (scale_tensor, False)], mutated=(0, 3), masks_at=2,
            packed_masks=packed_masks)


sgd_update_triton_ = triton_op("sfron_ops::sgd_update_triton_", _sgd_update,
                               mutates_args={"params", "momentum_buffers", "steps"})


def sgd_update_(params: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor],
                momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], norm_state: Optional[torch.Tensor],
                *, lr: float, scale: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                max_norm: float, packed_masks: bool = False, lr_tensor: Optional[torch.Tensor] = None,
                scale_tensor: Optional[torch.Tensor] = None) -> None:
    """``sfron_ops::sgd_update_`` in one Triton launch (per dtype group); see the module docstring."""
    run = sgd_update_triton_ if torch.compiler.is_compiling() else _sgd_update
    # tensor arguments go before the keyword-only ones: torch.library ops take no keyword-only tensors
    run(params, grads, masks, momentum_buffers, steps, norm_state, lr_tensor, scale_tensor, lr=lr, scale=scale,
        momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, max_norm=max_norm,
        packed_masks=packed_masks)
