"""slow_sync_: slow <- slow + a (p - slow), exact at a = 0 and 1; p <- slow when reset_fast."""

import pytest
import torch
from helpers import DTYPES, assert_lists_close, clones, dtype_id, kernels, make, odd_layouts, shapes_for

from sfron_ops import reference


def test_reference_hand_checked():
    s, p = [torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 4.0])]
    reference.slow_sync_(s, p, alpha=0.25, reset_fast=False)
    assert s[0].tolist() == [0.25, 2.5] and p[0].tolist() == [1.0, 4.0]
    reference.slow_sync_(s, p, alpha=0.75, reset_fast=True)
    assert s[0].tolist() == [0.8125, 3.625] and p[0].tolist() == s[0].tolist()


@pytest.mark.parametrize("reset_fast", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", ["sizes", "many"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(impl, device, dtype, case, alpha, reset_fast):
    shapes = shapes_for(case)
    slow, fast = make(shapes, dtype, device, -50, 50), make(shapes, dtype, device, -50, 50)
    expected, actual = [clones(slow), clones(fast)], [clones(slow), clones(fast)]
    reference.slow_sync_(*expected, alpha=alpha, reset_fast=reset_fast)
    kernels(impl)["slow_sync"](*actual, alpha=alpha, reset_fast=reset_fast)
    # the two-sided form is exact at both ends; at 0.5 the float32 result is the exact midpoint of two
    # half-precision values (often a tie), so it checks round-to-nearest-even bit for bit
    exact = dict(rtol=0, atol=0) if alpha in (0.0, 0.5, 1.0) else {}
    assert_lists_close(actual[0], expected[0], "slow", **exact)
    assert_lists_close(actual[1], expected[1], "fast", **exact)
    if alpha in (0.0, 1.0):  # the ends are the inputs themselves
        assert_lists_close(actual[0], slow if alpha == 0.0 else fast, "slow", rtol=0, atol=0)
    if reset_fast:
        assert_lists_close(actual[1], actual[0], "fast", rtol=0, atol=0)
    else:
        assert_lists_close(actual[1], fast, "fast", rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.75])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_special_values_match_the_reference_bit_for_bit(impl, device, dtype, alpha):
    """Infinities, NaNs and signed zeros, where the two-sided lerp does not return an end point as
    it is (p = -0.0 with slow > 0 gives +0.0 at a = 1; an infinite slow gives NaN): a kernel that
    skips writing p where slow already equals it must still write these."""
    special = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3e38, -3e38]
    pairs = torch.tensor([(a, b) for a in special for b in special]).T
    n = 2 * 4099  # the pairs twice over, then zeros: several tiles and an odd tail
    slow = torch.zeros(n, dtype=dtype, device=device)
    params = torch.zeros(n, dtype=dtype, device=device)
    for start in (0, n // 2):
        slow[start:start + pairs.shape[1]] = pairs[0].to(dtype)
        params[start:start + pairs.shape[1]] = pairs[1].to(dtype)
    expected, actual = ([slow.clone()], [params.clone()]), ([slow.clone()], [params.clone()])
    reference.slow_sync_(*expected, alpha=alpha, reset_fast=True)
    kernels(impl)["slow_sync"](*actual, alpha=alpha, reset_fast=True)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for what, a, e in (("slow", actual[0][0], expected[0][0]), ("params", actual[1][0], expected[1][0])):
        assert torch.equal(a.isnan(), e.isnan()), what
        keep = ~e.isnan()
        assert torch.equal(a[keep].view(bits), e[keep].view(bits)), what


def test_non_contiguous_tensors_are_updated_in_place(impl, device):
    params = odd_layouts(device)
    slow = [p.clone() * 0.5 for p in params]  # clone keeps each layout
    expected = [[s.clone() for s in slow], [p.clone() for p in params]]
    reference.slow_sync_(*expected, alpha=0.25, reset_fast=True)
    kernels(impl)["slow_sync"](slow, params, alpha=0.25, reset_fast=True)
    assert_lists_close(slow, expected[0], "slow_params")
    assert_lists_close(params, expected[1], "params")


def test_empty_call_does_nothing(impl, device):
    kernels(impl)["slow_sync"]([], [], alpha=0.5, reset_fast=True)


def test_bad_call_names_the_argument(impl, device):
    with pytest.raises(RuntimeError, match=r"slow_sync_: slow_params\[0\] has dtype torch.float16, expected "
                                           r"torch.float32"):
        kernels(impl)["slow_sync"]([torch.zeros(3, dtype=torch.float16, device=device)],
                                   [torch.ones(3, device=device)], alpha=0.5, reset_fast=True)


def test_reference_counts_to_the_period_and_skips_on_a_flag():
    s, p = [torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 4.0])]
    counter, fine, bad = torch.tensor(0.0), torch.zeros(2), torch.tensor([0.0, 1.0])
    reference.slow_sync_(s, p, alpha=0.5, reset_fast=False, counter=counter, period=3)
    reference.slow_sync_(s, p, alpha=0.5, reset_fast=False, norm_state=bad, counter=counter, period=3)
    assert s[0].tolist() == [0.0, 2.0] and counter.item() == 1.0  # counted once; the flagged call did nothing
    reference.slow_sync_(s, p, alpha=0.5, reset_fast=False, norm_state=fine, counter=counter, period=3)
    assert s[0].tolist() == [0.0, 2.0] and counter.item() == 2.0
    reference.slow_sync_(s, p, alpha=0.5, reset_fast=False, norm_state=fine, counter=counter, period=3)
    assert s[0].tolist() == [0.5, 3.0] and counter.item() == 0.0  # the third counted call syncs


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_counter_and_flag_match_reference(impl, device, dtype):
    shapes = shapes_for("sizes")
    slow, fast = make(shapes, dtype, device, -50, 50), make(shapes, dtype, device, -50, 50)
    expected, actual = [clones(slow), clones(fast)], [clones(slow), clones(fast)]
    counters = [torch.tensor(0.0, device=device), torch.tensor(0.0, device=device)]
    flags = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # skipped calls count for nothing
    for flag in flags:
        for lists, counter, kernel in ((expected, counters[0], reference.slow_sync_),
                                       (actual, counters[1], kernels(impl)["slow_sync"])):
            kernel(*lists, alpha=0.3, reset_fast=True, norm_state=torch.tensor([0.0, flag], device=device),
                   counter=counter, period=2)
        assert counters[1].item() == counters[0].item()
        assert_lists_close(actual[0], expected[0], "slow")
        assert_lists_close(actual[1], expected[1], "fast")
    assert counters[0].item() == 1.0  # five counted calls: two syncs, one step counted since
    assert not torch.equal(expected[0][2], slow[2])  # the syncs moved the slow weights
