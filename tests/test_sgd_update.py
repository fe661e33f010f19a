"""sgd_update_: torch.optim.SGD's rule with u = scale * clip * m * g, skipped on a non-finite flag."""

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
    odd_layouts,
    shapes_for,
    steps_for,
    update_inputs,
    update_matrix,
)

from sfron_ops import reference
from sfron_ops.reference import pack_mask

HYPER = [
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False),
    dict(lr=0.1, momentum=0.8, dampening=0.25, weight_decay=0.0, nesterov=False),
    dict(lr=0.02, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True),
    dict(lr=0.3, momentum=0.0, dampening=0.0, weight_decay=1e-3, nesterov=False),
]


def _sgd(kernel, params, grads, masks, bufs, steps, norm_state, packed=False, scale=1.0, max_norm=0.0, **hyper):
    kernel(params, grads, masks, bufs if hyper["momentum"] else [], steps, norm_state, scale=scale,
           max_norm=max_norm, packed_masks=packed, **hyper)


def _buffers(params, steps):
    # a buffer is zero until its first step, as the optimizer allocates it
    return [torch.zeros_like(p) if s.item() == 0 else torch.rand_like(p) for p, s in zip(params, steps)]


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


@update_matrix
def test_matches_reference(impl, device, dtype, case, mask_kind, norm):
    scale = -7.5 if mask_kind != "none" else 1.0
    hyper, params, grads, masks, packed, steps, norm_state = update_inputs(case, mask_kind, dtype, device, norm,
                                                                            HYPER, scale)
    bufs = _buffers(params, steps)
    max_norm = 1.5 if norm == "clip" else 0.0

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
        assert_lists_close(actual[1], bufs, "momentum_buffers", rtol=0, atol=0)
        assert_lists_close(actual[2], steps, "steps", rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tensor_scalars_match_numbers(impl, device, dtype):
    """lr and the ascent scale as float32 0-dim tensors on the device: the same result as the numbers."""
    shapes = shapes_for("sizes")
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, _ = make_masks("random", shapes, device)
    steps = steps_for(shapes, device)
    bufs = _buffers(params, steps)
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


def test_non_finite_gradient_skips_the_step(impl, device):
    """The backend's own norm flags the NaN, and its update then changes nothing, step counters included."""
    params, grads, state = flagged_step(impl, device)
    bufs = [torch.rand_like(p) for p in params]
    steps = [torch.tensor(4.0, device=device), torch.tensor(0.0, device=device)]
    before = [clones(params), clones(bufs), clones(steps)]
    kernels(impl)["sgd_update"](params, grads, [], bufs, steps, state, lr=0.1, scale=1.0, momentum=0.9,
                                dampening=0.0, weight_decay=0.1, nesterov=False, max_norm=1.0)
    for what, after, b in zip(("params", "momentum_buffers", "steps"), (params, bufs, steps), before):
        assert_lists_close(after, b, what, rtol=0, atol=0)


def test_non_contiguous_tensors_are_updated_in_place(impl, device):
    params = odd_layouts(device)
    grads = [torch.randn_like(p).contiguous() for p in params]  # contiguous, unlike most params
    bufs = [torch.randn_like(p) for p in params]  # preserve_format: laid out like their params
    masks = [torch.rand_like(p) < 0.5 for p in params]
    steps = [torch.tensor(float(i % 2), device=device) for i in range(len(params))]
    hyper = dict(HYPER[2], scale=1.0, max_norm=0.0)
    expected = [[p.clone() for p in params], [b.clone() for b in bufs], clones(steps)]
    originals = [p.data_ptr() for p in params]
    reference.sgd_update_(expected[0], grads, masks, expected[1], expected[2], None, **hyper)
    kernels(impl)["sgd_update"](params, grads, masks, bufs, steps, None, **hyper)
    assert [p.data_ptr() for p in params] == originals
    assert_lists_close(params, expected[0], "params")
    assert_lists_close(bufs, expected[1], "momentum_buffers")
    assert_lists_close(steps, expected[2], "steps", rtol=0, atol=0)


def test_empty_call_does_nothing(impl, device):
    state = torch.tensor([1.0, 0.0], device=device)
    kernels(impl)["sgd_update"]([], [], [], [], [], state, lr=0.1, scale=1.0, momentum=0.9, dampening=0.0,
                                weight_decay=0.0, nesterov=False, max_norm=1.0)
    assert state.tolist() == [1.0, 0.0]


def _bad_calls(device):
    def lists():
        params = [torch.randn(4, device=device), torch.randn(3, device=device)]
        return dict(params=params, grads=[torch.randn(4, device=device), torch.randn(3, device=device)], masks=[],
                    momentum_buffers=[torch.zeros(4, device=device), torch.zeros(3, device=device)],
                    steps=[torch.tensor(1.0, device=device), torch.tensor(1.0, device=device)], norm_state=None)

    cases = []
    c = lists()
    c["grads"][1] = torch.randn(5, device=device)
    cases.append((c, r"sgd_update_: grads\[1\] has shape \(5,\), expected \(3,\)"))
    c = lists()
    c["momentum_buffers"] = c["momentum_buffers"][:1]
    cases.append((c, r"sgd_update_: momentum_buffers has 1 tensors, expected 2"))
    c = lists()
    c["steps"][0] = torch.tensor(1.0, dtype=torch.float64, device=device)
    cases.append((c, r"sgd_update_: steps\[0\] must be a float32 scalar, got torch.float64 with 1 elements"))
    c = lists()
    c["masks"] = [pack_mask(torch.ones(4, dtype=torch.bool, device=device)), torch.ones(3, device=device)]
    c["packed"] = True
    cases.append((c, r"sgd_update_: packed masks\[1\] must be contiguous uint8 with 1 bytes, got torch.float32"))
    c = lists()
    c["masks"] = [torch.ones(4, device=device), torch.ones(3, dtype=torch.int32, device=device)]
    cases.append((c, r"sgd_update_: masks\[1\] has unsupported dtype torch.int32"))
    c = lists()
    c["grads"][0] = c["grads"][0].double()
    cases.append((c, r"sgd_update_: grads\[0\] has dtype torch.float64, expected torch.float32"))
    c = lists()
    c["norm_state"] = torch.zeros(3, device=device)
    cases.append((c, r"sgd_update_: norm_state must be a float32 tensor of 2 elements, got torch.float32 with 3"))
    return cases


@pytest.mark.parametrize("index", range(7))
def test_bad_calls_name_the_argument_and_change_nothing(impl, device, index):
    call, message = _bad_calls(device)[index]
    packed = call.pop("packed", False)
    before = [t.clone() for t in call["params"] + call["momentum_buffers"] + call["steps"]]
    with pytest.raises(RuntimeError, match=message):
        kernels(impl)["sgd_update"](call["params"], call["grads"], call["masks"], call["momentum_buffers"],
                                    call["steps"], call["norm_state"], lr=0.1, scale=1.0, momentum=0.9, dampening=0.0,
                                    weight_decay=0.0, nesterov=False, max_norm=0.0, packed_masks=packed)
    after = call["params"] + call["momentum_buffers"] + call["steps"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
