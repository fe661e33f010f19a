"""slow_sync_: slow <- slow + a (p - slow), exact at a = 0 and 1; p <- slow when reset_fast."""

import pytest
import torch
from helpers import DTYPES, assert_lists_close, clones, dtype_id, kernels, make, shapes_for

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
    assert_lists_close(actual[0], expected[0], "slow")
    assert_lists_close(actual[1], expected[1], "fast")
    if alpha in (0.0, 1.0):  # the ends are exact, not just close
        assert_lists_close(actual[0], slow if alpha == 0.0 else fast, "slow", rtol=0, atol=0)
    if reset_fast:
        assert_lists_close(actual[1], actual[0], "fast", rtol=0, atol=0)
    else:
        assert_lists_close(actual[1], fast, "fast", rtol=0, atol=0)


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
