"""adamw_update_: torch.optim.AdamW's rule with u = scale * clip * m * g, skipped on a non-finite flag."""

import pytest
import torch
from helpers import (
    DTYPES,
    MASK_KINDS,
    assert_lists_close,
    clones,
    dtype_id,
    kernels,
    make,
    make_masks,
    shapes_for,
    steps_for,
)

from sfron_ops import reference

HYPER = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    dict(lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05),
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


@pytest.mark.parametrize("norm", ["none", "clip", "skip"])
@pytest.mark.parametrize("case", ["sizes", "many"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(impl, device, dtype, case, mask_kind, norm):
    shapes = shapes_for(case)
    hyper = HYPER[(len(mask_kind) + len(norm)) % len(HYPER)]
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, packed = make_masks(mask_kind, shapes, device, dtype)
    steps = steps_for(shapes, device)
    m1 = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) - 0.5 for p, s in zip(params, steps)]
    m2 = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) for p, s in zip(params, steps)]
    scale = -4.0 if mask_kind != "none" else 1.0
    norm_state, max_norm = None, 0.0
    if norm != "none":
        norm_state = torch.zeros(2, device=device)
        reference.masked_sq_norm_(grads, masks, norm_state, alpha=abs(scale), packed_masks=packed)
        max_norm = 2.0 if norm == "clip" else 0.0
        if norm == "skip":
            norm_state[1] = 1.0
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


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tensor_scalars_match_numbers(impl, device, dtype):
    """lr and the ascent scale as float32 0-dim tensors on the device: the same result as the numbers
    (the weight decay factor 1 - lr * wd is formed in float64 from either)."""
    shapes = shapes_for("sizes")
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, _ = make_masks("float", shapes, device, dtype)
    steps = steps_for(shapes, device)
    m1 = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) - 0.5 for p, s in zip(params, steps)]
    m2 = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) for p, s in zip(params, steps)]
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
