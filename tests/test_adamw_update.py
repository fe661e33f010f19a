"""adamw_update_: torch.optim.AdamW's rule with u = scale * clip * m * g, skipped on a non-finite flag."""

import pytest
import torch
from helpers import (
    DTYPES,
    assert_lists_close,
    clones,
    dtype_id,
    flagged_step,
    kernels,
    make,
    make_masks,
    shapes_for,
    steps_for,
    update_inputs,
    update_matrix,
)

from sfron_ops import reference

HYPER = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    dict(lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05),
    dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05),
    dict(lr=1e-3, beta1=0.0, beta2=0.5, eps=1e-3, weight_decay=0.0),
]


def _adamw(kernel, params, grads, masks, m1, m2, steps, norm_state, packed=False, scale=1.0, max_norm=0.0, **hyper):
    kernel(params, grads, masks, m1, m2, steps, norm_state, scale=scale, max_norm=max_norm, packed_masks=packed,
           **hyper)


def test_reference_first_step_is_sign_like():
    p, g = torch.tensor([1.0, 1.0]), torch.tensor([0.5, -2.0])
    m1, m2, step = torch.zeros(2), torch.zeros(2), torch.tensor(0.0)
    _adamw(reference.adamw_update_, [p], [g], [], [m1], [m2], [step], None, lr=0.1, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=0.5)
    # bias-corrected m1/sqrt(m2) = sign(g) on the first step; decay multiplies by (1 - 0.1 * 0.5)
    torch.testing.assert_close(p, torch.tensor([0.95 - 0.1, 0.95 + 0.1]))
    torch.testing.assert_close(m1, torch.tensor([0.05, -0.2]))
    torch.testing.assert_close(m2, torch.tensor([0.00025, 0.004]))
    assert step.item() == 1.0


def test_reference_matches_torch_adamw():
    torch.manual_seed(1)
    p = torch.randn(50, requires_grad=True)
    ours = p.detach().clone()
    m1, m2, step = torch.zeros(50), torch.zeros(50), torch.tensor(0.0)
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, foreach=False)
    for _ in range(10):
        g = torch.randn(50)
        p.grad = g.clone()
        opt.step()
        _adamw(reference.adamw_update_, [ours], [g], [], [m1], [m2], [step], None, lr=1e-2, beta1=0.8, beta2=0.95,
               eps=1e-6, weight_decay=0.05)
    torch.testing.assert_close(ours, p.detach())
    torch.testing.assert_close(m1, opt.state[p]["exp_avg"])
    torch.testing.assert_close(m2, opt.state[p]["exp_avg_sq"])


def _moments(params, steps):
    # zero until the first step, as the optimizer allocates them
    m1 = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) - 0.5 for p, s in zip(params, steps)]
    m2 = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) for p, s in zip(params, steps)]
    return m1, m2


@update_matrix
def test_matches_reference(impl, device, dtype, case, mask_kind, norm):
    scale = -4.0 if mask_kind != "none" else 1.0
    hyper, params, grads, masks, packed, steps, norm_state = update_inputs(case, mask_kind, dtype, device, norm,
                                                                            HYPER, scale)
    m1, m2 = _moments(params, steps)
    max_norm = 2.0 if norm == "clip" else 0.0
    expected = [clones(params), clones(m1), clones(m2), clones(steps)]
    actual = [clones(params), clones(m1), clones(m2), clones(steps)]
    reference.adamw_update_(expected[0], grads, masks, expected[1], expected[2], expected[3],
                            None if norm_state is None else norm_state.clone(), scale=scale, max_norm=max_norm,
                            packed_masks=packed, **hyper)
    kernels(impl)["adamw_update"](actual[0], grads, masks, actual[1], actual[2], actual[3],
                                  None if norm_state is None else norm_state.clone(), scale=scale,
                                  max_norm=max_norm, packed_masks=packed, **hyper)
    assert_lists_close(actual[0], expected[0], "params")
    assert_lists_close(actual[1], expected[1], "exp_avgs")
    assert_lists_close(actual[2], expected[2], "exp_avg_sqs")
    assert_lists_close(actual[3], expected[3], "steps", rtol=0, atol=0)
    if norm == "skip":
        assert_lists_close(actual[0], params, "params", rtol=0, atol=0)
        assert_lists_close(actual[1], m1, "exp_avgs", rtol=0, atol=0)
        assert_lists_close(actual[3], steps, "steps", rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tensor_scalars_match_numbers(impl, device, dtype):
    """lr and the ascent scale as float32 0-dim tensors on the device: the same result as the numbers
    (the weight decay factor 1 - lr * wd is formed in float64 from either)."""
    shapes = shapes_for("sizes")
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, _ = make_masks("float", shapes, device, dtype)
    steps = steps_for(shapes, device)
    m1, m2 = _moments(params, steps)
    hyper = dict(beta1=0.85, beta2=0.99, eps=1e-7, weight_decay=0.05, max_norm=0.0)
    lr = 0.0078125  # a power of two, so the float32 tensor holds the number exactly
    expected = [clones(params), clones(m1), clones(m2), clones(steps)]
    actual = [clones(params), clones(m1), clones(m2), clones(steps)]
    reference.adamw_update_(*expected[:1], grads, masks, *expected[1:], None, lr=lr, scale=-3.0, **hyper)
    kernels(impl)["adamw_update"](*actual[:1], grads, masks, *actual[1:], None, lr=1.0, scale=-1.0,
                                  lr_tensor=torch.tensor(lr, device=device),
                                  scale_tensor=torch.tensor(3.0, device=device), **hyper)
    for what, a, e in zip(("params", "exp_avgs", "exp_avg_sqs"), actual, expected):
        assert_lists_close(a, e, what)
    assert_lists_close(actual[3], expected[3], "steps", rtol=0, atol=0)


def test_one_call_mixes_dtypes_and_mask_kinds(impl, device):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    shapes = [(70000,), (33,), (4097,), (9,), (0,)]
    params, grads, m1 = ([torch.randn(s, device=device).to(d) for s, d in zip(shapes, dtypes)] for _ in range(3))
    m2 = [torch.rand(s, device=device).to(d) for s, d in zip(shapes, dtypes)]
    masks = [torch.rand(s, device=device).to(md) for s, md in
             zip(shapes, [torch.bfloat16, torch.float32, torch.float64, torch.float16, torch.float32])]
    masks[1] = masks[1] < 0.5
    state = torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, state, alpha=2.0)
    hyper = dict(HYPER[2], scale=-2.0, max_norm=0.3)
    steps = steps_for(shapes, device)
    expected = [clones(params), clones(m1), clones(m2), clones(steps)]
    actual = [clones(params), clones(m1), clones(m2), clones(steps)]
    reference.adamw_update_(expected[0], grads, masks, *expected[1:], state.clone(), **hyper)
    kernels(impl)["adamw_update"](actual[0], grads, masks, *actual[1:], state.clone(), **hyper)
    for what, a, e in zip(("params", "exp_avgs", "exp_avg_sqs"), actual, expected):
        assert_lists_close(a, e, what)
    assert_lists_close(actual[3], expected[3], "steps", rtol=0, atol=0)


def test_non_finite_gradient_skips_the_step(impl, device):
    """The backend's own norm flags the NaN, and its update then changes nothing, step counters included."""
    params, grads, state = flagged_step(impl, device)
    m1, m2 = [torch.rand_like(p) for p in params], [torch.rand_like(p) for p in params]
    steps = [torch.tensor(4.0, device=device), torch.tensor(0.0, device=device)]
    before = [clones(params), clones(m1), clones(m2), clones(steps)]
    kernels(impl)["adamw_update"](params, grads, [], m1, m2, steps, state, lr=0.1, scale=1.0, beta1=0.9, beta2=0.99,
                                  eps=1e-8, weight_decay=0.1, max_norm=1.0)
    for what, after, b in zip(("params", "exp_avgs", "exp_avg_sqs", "steps"), (params, m1, m2, steps), before):
        assert_lists_close(after, b, what, rtol=0, atol=0)


def test_only_empty_tensors_still_count_steps(impl, device):
    """Nothing to update, but every step counter advances, as in the reference."""
    params = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    steps = [torch.tensor(2.0, device=device), torch.tensor(0.0, device=device)]
    kernels(impl)["adamw_update"](params, clones(params), [], clones(params), clones(params), steps, None, lr=0.1,
                                  scale=1.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, max_norm=0.0)
    assert [s.item() for s in steps] == [3.0, 1.0]


def test_empty_call_does_nothing(impl, device):
    kernels(impl)["adamw_update"]([], [], [], [], [], [], None, lr=0.1, scale=1.0, beta1=0.9, beta2=0.99, eps=1e-8,
                                  weight_decay=0.0, max_norm=0.0)


def test_bad_call_names_the_argument(impl, device):
    d = device
    with pytest.raises(RuntimeError, match=r"adamw_update_: exp_avg_sqs\[0\] has shape \(2,\), expected \(3,\)"):
        kernels(impl)["adamw_update"]([torch.ones(3, device=d)], [torch.ones(3, device=d)], [],
                                      [torch.ones(3, device=d)], [torch.ones(2, device=d)],
                                      [torch.tensor(0.0, device=d)], None, lr=0.1, scale=1.0, beta1=0.9, beta2=0.99,
                                      eps=1e-8, weight_decay=0.0, max_norm=0.0)
