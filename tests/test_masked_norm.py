"""masked_sq_norm_: norm_state[0] += sum((alpha*m*g)^2), norm_state[1] flags non-finite values."""

import math

import pytest
import torch
from helpers import DTYPES, MASK_KINDS, clones, dtype_id, kernels, make, make_masks, shapes_for

from sfron_ops import reference


def test_reference_hand_checked():
    g = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0], [2.0]])]
    m = [torch.tensor([True, False]), torch.tensor([[0.5], [1.0]])]
    state = torch.tensor([1.0, 0.0])
    reference.masked_sq_norm_(g, m, state, alpha=2.0)
    # (2*3)^2 + 0 + (2*0.5*1)^2 + (2*2)^2 = 36 + 1 + 16, added to the 1 already there
    assert state.tolist() == [54.0, 0.0]
    reference.masked_sq_norm_([torch.tensor([1.0, math.inf])], [torch.tensor([True, False])], state, alpha=1.0)
    # inf * 0 is NaN: a masked non-finite gradient still poisons the direction, as in the official p.grad *= mask
    assert state[1].item() == 1.0


def test_reference_flag_is_sticky_and_ignores_finite_calls():
    state = torch.tensor([0.0, 1.0])
    reference.masked_sq_norm_([torch.ones(3)], [], state, alpha=1.0)
    assert state.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("case", ["sizes", "many"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(impl, device, dtype, case, mask_kind):
    shapes = shapes_for(case)
    grads = make(shapes, dtype, device)
    masks, packed = make_masks(mask_kind, shapes, device, dtype)
    expected = torch.tensor([0.25, 0.0], device=device)
    actual = expected.clone()
    reference.masked_sq_norm_(grads, masks, expected, alpha=3.5, packed_masks=packed)
    before = clones(grads)
    kernels(impl)["masked_norm"](grads, masks, actual, alpha=3.5, packed_masks=packed)
    # summation order differs between backends over up to 10^5 float32 terms
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    for g, b in zip(grads, before):
        assert torch.equal(g, b), "the gradients must not be modified"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_finite_detected(impl, device, dtype, bad):
    grads = make(shapes_for("sizes"), dtype, device)
    grads[3][4000] = bad
    state = torch.zeros(2, device=device)
    kernels(impl)["masked_norm"](grads, [], state, alpha=1.0)
    assert state[1].item() == 1.0
    state = torch.zeros(2, device=device)
    kernels(impl)["masked_norm"](grads[:3] + grads[4:], [], state, alpha=1.0)
    assert state[1].item() == 0.0


def test_tensor_alpha_matches_number(impl, device):
    grads = make(shapes_for("sizes"), torch.float32, device)
    masks, _ = make_masks("random", shapes_for("sizes"), device)
    expected, actual = torch.zeros(2, device=device), torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, expected, alpha=3.5)
    kernels(impl)["masked_norm"](grads, masks, actual, alpha=1.0, alpha_tensor=torch.tensor(3.5, device=device))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
