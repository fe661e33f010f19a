r"""adamw_update_: torch.optim.AdamW's rule with the SFR-on direction in place of the gradient, one pass.

.. math::
   u &= (g \odot m)\, c \quad (c \text{ as in } \texttt{sgd\_update\_}), \qquad t = \text{step} + 1\\
   m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) u, \qquad m_2 \leftarrow \beta_2 m_2 + (1-\beta_2) u^2\\
   \theta &\leftarrow \theta (1 - \eta\lambda_w)
      - \eta \frac{m_1 / (1-\beta_1^t)}{\sqrt{m_2 / (1-\beta_2^t)} + \epsilon},
   \qquad \text{step} \leftarrow t

Divisions and square roots are IEEE-rounded (``div_rn``/``sqrt_rn``) like the
reference's; :math:`\beta^t` is computed in float64 and rounded to float32, a
correctly rounded ``powf``. Nothing is written when ``norm_state[1] > 0``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _ops
from . import _common as tc


@tc.device_function
def _bias_correction(beta, t):
    """1 - beta^t in float32, with beta^t rounded once from float64."""
    power = tl.exp(t.to(tl.float64) * tl.log(tl.cast(beta, tl.float64))).to(tl.float32)
    return 1.0 - power


@tc.device_function
def _adamw_chunk(p_ptr, g_ptr, m_ptr, m1_ptr, m2_ptr, start, numel, coef, lr, beta1, beta2, one_minus_beta1,
                 one_minus_beta2, eps, decay, bias1, bias2, MASK_KIND: tl.constexpr, EVEN: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    for i in range(0, tc.chunk_extent(start, numel, EVEN, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        u = tc.direction(tc.load_f32(g_ptr, offs, numel, EVEN), tc.load_mask(m_ptr, offs, numel, MASK_KIND, EVEN),
                         coef, MASK_KIND)
        m1 = beta1 * tc.load_f32(m1_ptr, offs, numel, EVEN) + one_minus_beta1 * u
        m2 = beta2 * tc.load_f32(m2_ptr, offs, numel, EVEN) + one_minus_beta2 * u * u
        denom = tl.sqrt_rn(tl.math.div_rn(m2, bias2)) + eps
        p = tc.load_f32(p_ptr, offs, numel, EVEN) * decay - tl.math.div_rn(lr * tl.math.div_rn(m1, bias1), denom)
        tc.store(m1_ptr, offs, m1, numel, EVEN)
        tc.store(m2_ptr, offs, m2, numel, EVEN)
        tc.store(p_ptr, offs, p, numel, EVEN)


@triton.jit(do_not_specialize=["num_chunks", "num_tensors"])
def _adamw_update_kernel(table, num_chunks, num_tensors, params, grads, masks, exp_avgs, exp_avg_sqs, steps, numel,
                         norm_state, counter, lr, scale, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay,
                         weight_decay, max_norm, lr_tensor, scale_tensor, TABLE: tl.constexpr,
                         MASK_KIND: tl.constexpr, HAS_NORM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNK: tl.constexpr, STEP_BLOCK: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                         HAS_SCALE_TENSOR: tl.constexpr):
    coef, skip = tc.clip_and_skip(norm_state, tc.times_tensor(scale, scale_tensor, HAS_SCALE_TENSOR), max_norm,
                                  HAS_NORM)
    if HAS_LR_TENSOR:
        # 1 - lr * wd in float64, from the float32 tensor lr as from the Python one
        lr = lr * tl.load(lr_tensor)
        decay = (1.0 - lr.to(tl.float64) * weight_decay).to(tl.float32)
    if not skip:
        # row: params, grads, masks, exp_avgs, exp_avg_sqs, steps, numel
        row, start, n = tc.program_chunk(table if TABLE else None, num_chunks, numel, 7, CHUNK, TABLE)
        p_ptr = tc.tensor_at(row, 0, params, ALIGNED, TABLE)
        g_ptr = tc.tensor_at(row, 1, grads, ALIGNED, TABLE)
        m_ptr = tc.tensor_at(row, 2, masks, ALIGNED, TABLE)
        m1_ptr = tc.tensor_at(row, 3, exp_avgs, ALIGNED, TABLE)
        m2_ptr = tc.tensor_at(row, 4, exp_avg_sqs, ALIGNED, TABLE)
        t = tl.load(tc.tensor_at(row, 5, steps, False, TABLE)) + 1.0
        bias1 = _bias_correction(beta1, t)
        bias2 = _bias_correction(beta2, t)
        if start + CHUNK <= n:
            _adamw_chunk(p_ptr, g_ptr, m_ptr, m1_ptr, m2_ptr, start, n, coef, lr, beta1, beta2, one_minus_beta1,
                         one_minus_beta2, eps, decay, bias1, bias2, MASK_KIND, True, BLOCK, CHUNK)
        else:
            _adamw_chunk(p_ptr, g_ptr, m_ptr, m1_ptr, m2_ptr, start, n, coef, lr, beta1, beta2, one_minus_beta1,
                         one_minus_beta2, eps, decay, bias1, bias2, MASK_KIND, False, BLOCK, CHUNK)
        if tc.arrive(counter):
            tc.advance_steps(table, num_chunks, num_tensors, steps, 7, 5, TABLE, STEP_BLOCK)
            tl.store(counter, 0)


def _adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor],
                  exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                  norm_state: Optional[torch.Tensor], lr_tensor: Optional[torch.Tensor] = None,
                  scale_tensor: Optional[torch.Tensor] = None, *, lr: float, scale: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, max_norm: float,
                  packed_masks: bool = False) -> None:
    kind = tc.mask_kind(masks, packed_masks)

    def check():
        _ops.check_adamw_update(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, lr=lr, scale=scale,
                                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, max_norm=max_norm,
                                packed_masks=packed_masks, lr_tensor=lr_tensor, scale_tensor=scale_tensor)

    def issue(call, witnesses, state, trace):
        counter, _ = tc.workspace(call.device, 0, trace)
        tc.launch(wrap_triton(_adamw_update_kernel) if trace else _adamw_update_kernel, call.grid,
                  (call.table, call.num_chunks, call.num_tensors, *witnesses, call.numel,
                   tc.optional_arg(state[0], call.device), counter, float(lr), float(scale), float(beta1),
                   float(beta2), float(1 - beta1), float(1 - beta2), float(eps), float(1 - lr * weight_decay),
                   float(weight_decay), float(max_norm), tc.optional_arg(state[1], call.device),
                   tc.optional_arg(state[2], call.device)),
                  trace=trace, TABLE=call.table_mode, MASK_KIND=kind, HAS_NORM=state[0] is not None,
                  ALIGNED=call.aligned, BLOCK=tc.BLOCK, CHUNK=tc.CHUNK, STEP_BLOCK=tc.STEP_BLOCK,
                  HAS_LR_TENSOR=state[1] is not None, HAS_SCALE_TENSOR=state[2] is not None)

    columns = [params, grads, masks or None, exp_avgs, exp_avg_sqs, steps]
    tc.execute("adamw_update", columns, 5, tc.CHUNK, check=check, issue=issue, flags=(kind,),
               state=[(norm_state, False), (lr_tensor, False), (scale_tensor, False)], mutated=(0, 3, 4), masks_at=2,
               packed_masks=packed_masks)


adamw_update_, adamw_update_triton_ = tc.op_entry("adamw_update", _adamw_update,
                                                  {"params", "exp_avgs", "exp_avg_sqs", "steps"})
