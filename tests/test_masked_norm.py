"""masked_sq_norm_: norm_state[0] += sum((alpha*m*g)^2), norm_state[1] flags non-finite values."""

import math

import pytest
import torch
from helpers import DTYPES, MASK_KINDS, SIZES, clones, dtype_id, kernels, make, make_masks, odd_layouts, shapes_for

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
    grads = make(shapes, dtype, device, -3.0, 3.0)
    masks, packed = make_masks(mask_kind, shapes, device, dtype)
    expected = torch.tensor([0.25, 0.0], device=device)  # the kernels add to what is there
    actual = expected.clone()
    reference.masked_sq_norm_(grads, masks, expected, alpha=-2.5, packed_masks=packed)
    before = clones(grads)
    kernels(impl)["masked_norm"](grads, masks, actual, alpha=-2.5, packed_masks=packed)
    # summation order differs between backends over up to 10^5 float32 terms
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    assert actual[1].item() == 0.0
    if mask_kind == "zeros":
        assert actual[0].item() == 0.25
    for g, b in zip(grads, before):
        assert torch.equal(g, b), "the gradients must not be modified"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's inf * 0
@pytest.mark.parametrize("masked_out", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_finite_detected(impl, device, dtype, bad, masked_out):
    grads = make(shapes_for("sizes"), dtype, device)
    big = SIZES.index(70000)
    grads[big][16384 + 3] = bad  # past the first chunk
    masks = [torch.ones_like(g) for g in grads]
    if masked_out:
        # (inf * 0) * alpha is NaN in the reference's order: a masked-out infinity still poisons the direction
        masks[big][16384 + 3] = 0.0
    expected, state = torch.zeros(2, device=device), torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, expected, alpha=1.0)
    kernels(impl)["masked_norm"](grads, masks, state, alpha=1.0)
    assert state[1].item() == expected[1].item() == 1.0
    state = torch.zeros(2, device=device)
    kernels(impl)["masked_norm"](grads[:big] + grads[big + 1:], masks[:big] + masks[big + 1:], state, alpha=1.0)
    assert state[1].item() == 0.0


def test_overflowing_square_is_not_a_non_finite_direction(impl, device):
    grads = [torch.full((3,), 3e30, device=device)]
    state = torch.zeros(2, device=device)
    kernels(impl)["masked_norm"](grads, [], state, alpha=1.0)
    assert state[0].item() == float("inf") and state[1].item() == 0.0


def test_tensor_alpha_matches_number(impl, device):
    grads = make(shapes_for("sizes"), torch.float32, device)
    masks, _ = make_masks("random", shapes_for("sizes"), device)
    expected, actual = torch.zeros(2, device=device), torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, expected, alpha=3.5)
    kernels(impl)["masked_norm"](grads, masks, actual, alpha=1.0, alpha_tensor=torch.tensor(3.5, device=device))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)


def test_mixed_dtypes_and_mask_kinds_in_one_call(impl, device):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    shapes = [(70000,), (33,), (4097,), (9,), (0,)]
    grads = [torch.randn(s, device=device).to(d) for s, d in zip(shapes, dtypes)]
    masks = [torch.rand(s, device=device).to(md) for s, md in
             zip(shapes, [torch.bfloat16, torch.float32, torch.float64, torch.float16, torch.float32])]
    masks[1] = masks[1] < 0.5
    expected, actual = torch.zeros(2, device=device), torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, expected, alpha=2.0)
    kernels(impl)["masked_norm"](grads, masks, actual, alpha=2.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)


def test_non_contiguous_tensors_and_norm_state(impl, device):
    grads = odd_layouts(device)
    masks = [torch.rand_like(g) < 0.5 for g in grads]
    expected, actual = torch.zeros(2, device=device), torch.zeros(4, device=device)[::2]  # a strided norm_state
    reference.masked_sq_norm_(grads, masks, expected, alpha=1.5)
    kernels(impl)["masked_norm"](grads, masks, actual, alpha=1.5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)


def test_empty_call_does_nothing(impl, device):
    state = torch.tensor([1.0, 0.0], device=device)
    kernels(impl)["masked_norm"]([], [], state, alpha=1.0)
    assert state.tolist() == [1.0, 0.0]


def test_bad_call_names_the_argument(impl, device):
    with pytest.raises(RuntimeError, match=r"masked_sq_norm_: grads\[0\] has non-floating dtype torch.int64"):
        kernels(impl)["masked_norm"]([torch.ones(3, dtype=torch.int64, device=device)], [],
                                     torch.zeros(2, device=device), alpha=1.0)
