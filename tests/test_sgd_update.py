"""sgd_update_: torch.optim.SGD's rule with u = scale * clip * m * g, skipped on a non-finite flag."""

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
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False),
    dict(lr=0.1, momentum=0.8, dampening=0.25, weight_decay=0.0, nesterov=False),
    dict(lr=0.02, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True),
    dict(lr=0.3, momentum=0.0, dampening=0.0, weight_decay=1e-3, nesterov=False),
]


def _sgd(kernel, params, grads, masks, bufs, steps, norm_state, packed=False, scale=1.0, max_norm=0.0, **hyper):
    kernel(params, grads, masks, bufs if hyper["momentum"] else [], steps, norm_state, scale=scale,
           max_norm=max_norm, packed_masks=packed, **hyper)


def test_reference_hand_checked_two_steps():
    p, g, buf, step = torch.tensor([1.0]), torch.tensor([2.0]), torch.zeros(1), torch.tensor(0.0)
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
    _sgd(reference.sgd_update_, [p], [g], [], [buf], [step], None, **hyper)
    # first step: buf = d = 2, p = 1 - 0.1 * 2
    torch.testing.assert_close(p, torch.tensor([0.8]))
    torch.testing.assert_close(buf, torch.tensor([2.0]))
    assert step.item() == 1.0
    _sgd(reference.sgd_update_, [p], [g], [], [buf], [step], None, **hyper)
    # buf = 0.9 * 2 + 2 = 3.8, p = 0.8 - 0.38
    torch.testing.assert_close(buf, torch.tensor([3.8]))
    torch.testing.assert_close(p, torch.tensor([0.42]))
    assert step.item() == 2.0


def test_reference_forget_direction_mask_and_clip():
    p, g = torch.zeros(3), torch.tensor([3.0, 4.0, 12.0])
    m = torch.tensor([1, 1, 0], dtype=torch.uint8)
    state = torch.zeros(2)
    reference.masked_sq_norm_([g], [m], state, alpha=2.0)  # |u| = 2 * 5 = 10
    hyper = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    _sgd(reference.sgd_update_, [p], [g], [m], [], [torch.tensor(0.0)], state, scale=-2.0, max_norm=1.0, **hyper)
    # u = -2 * (3, 4, 0) clipped to norm 1: (-0.6, -0.8, 0); p = 0 - u (ascent on the loss)
    torch.testing.assert_close(p, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-6, atol=1e-6)


def test_reference_skip_changes_nothing():
    p, g, buf, step = torch.tensor([1.0]), torch.tensor([float("nan")]), torch.tensor([0.5]), torch.tensor(4.0)
    state = torch.zeros(2)
    reference.masked_sq_norm_([g], [], state, alpha=1.0)
    _sgd(reference.sgd_update_, [p], [g], [], [buf], [step], state, lr=0.1, momentum=0.9, dampening=0.0,
         weight_decay=0.1, nesterov=False)
    assert p.item() == 1.0 and buf.item() == 0.5 and step.item() == 4.0


@pytest.mark.parametrize("norm", ["none", "clip", "skip"])
@pytest.mark.parametrize("case", ["sizes", "many"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(impl, device, dtype, case, mask_kind, norm):
    shapes = shapes_for(case)
    hyper = HYPER[(len(mask_kind) + len(norm) + len(case)) % len(HYPER)]
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, packed = make_masks(mask_kind, shapes, device, dtype)
    steps = steps_for(shapes, device)
    # a buffer is zero until its first step, as the optimizer allocates it
    bufs = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) for p, s in zip(params, steps)]
    scale = -7.5 if mask_kind != "none" else 1.0
    norm_state, max_norm = None, 0.0
    if norm != "none":
        norm_state = torch.zeros(2, device=device)
        reference.masked_sq_norm_(grads, masks, norm_state, alpha=abs(scale), packed_masks=packed)
        max_norm = 1.5 if norm == "clip" else 0.0
        if norm == "skip":
            norm_state[1] = 1.0

    expected = [clones(params), clones(bufs), clones(steps)]
    actual = [clones(params), clones(bufs), clones(steps)]
    grads_before = clones(grads)
    _sgd(reference.sgd_update_, expected[0], grads, masks, expected[1], expected[2],
         None if norm_state is None else norm_state.clone(), packed, scale, max_norm, **hyper)
    _sgd(kernels(impl)["sgd_update"], actual[0], grads, masks, actual[1], actual[2],
         None if norm_state is None else norm_state.clone(), packed, scale, max_norm, **hyper)
    assert_lists_close(actual[0], expected[0], "params")
    assert_lists_close(actual[1], expected[1], "momentum_buffers")
    assert_lists_close(actual[2], expected[2], "steps", rtol=0, atol=0)
    for g, b in zip(grads, grads_before):
        assert torch.equal(g, b)
    if norm == "skip":
        assert_lists_close(actual[0], params, "params", rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tensor_scalars_match_numbers(impl, device, dtype):
    """lr and the ascent scale as float32 0-dim tensors on the device: the same result as the numbers."""
    shapes = shapes_for("sizes")
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, _ = make_masks("random", shapes, device)
    steps = steps_for(shapes, device)
    bufs = [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) for p, s in zip(params, steps)]
    norm_state = torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, norm_state, alpha=6.0)
    hyper = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, max_norm=2.5)
    expected = [clones(params), clones(bufs), clones(steps)]
    actual = [clones(params), clones(bufs), clones(steps)]
    reference.sgd_update_(expected[0], grads, masks, expected[1], expected[2], norm_state.clone(), lr=0.03,
                          scale=-6.0, **hyper)
    lr, alpha = torch.tensor(0.03, device=device), torch.tensor(6.0, device=device)
    kernels(impl)["sgd_update"](actual[0], grads, masks, actual[1], actual[2], norm_state.clone(), lr=1.0, scale=-1.0,
                                lr_tensor=lr, scale_tensor=alpha, **hyper)
    assert_lists_close(actual[0], expected[0], "params")
    assert_lists_close(actual[1], expected[1], "momentum_buffers")
    assert_lists_close(actual[2], expected[2], "steps", rtol=0, atol=0)
    assert lr.item() == pytest.approx(0.03) and alpha.item() == 6.0  # read, never written
