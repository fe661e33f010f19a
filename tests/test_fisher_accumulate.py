"""fisher_accumulate_: F += s * g^2 with float32 accumulators."""

import pytest
import torch
from helpers import DTYPES, assert_lists_close, clones, dtype_id, kernels, make, shapes_for

from sfron_ops import reference


def test_reference_hand_checked():
    f = [torch.tensor([1.0, 1.0])]
    reference.fisher_accumulate_(f, [torch.tensor([2.0, -3.0], dtype=torch.bfloat16)], scale=0.5)
    assert f[0].tolist() == [3.0, 5.5]
    assert f[0].dtype == torch.float32


def test_rejects_low_precision_accumulator():
    with pytest.raises(RuntimeError, match="fishers\\[0\\] has dtype torch.bfloat16"):
        reference.fisher_accumulate_([torch.zeros(2, dtype=torch.bfloat16)], [torch.ones(2)], scale=1.0)


@pytest.mark.parametrize("case", ["sizes", "many"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=dtype_id)
def test_matches_reference(impl, device, dtype, case):
    shapes = shapes_for(case)
    grads = make(shapes, dtype, device, -3.0, 3.0)
    start = make(shapes, torch.float32, device, 0.0, 2.0)
    expected, actual = clones(start), clones(start)
    reference.fisher_accumulate_(expected, grads, scale=0.125)
    kernels(impl)["fisher_accumulate"](actual, grads, scale=0.125)
    assert_lists_close(actual, expected, "fishers")


def test_empty_call_does_nothing(impl, device):
    kernels(impl)["fisher_accumulate"]([], [], scale=1.0)


def test_bad_call_names_the_argument(impl, device):
    with pytest.raises(RuntimeError, match=r"fisher_accumulate_: fishers\[0\] has dtype torch.bfloat16, expected "
                                           r"torch.float32"):
        kernels(impl)["fisher_accumulate"]([torch.zeros(3, dtype=torch.bfloat16, device=device)],
                                           [torch.ones(3, device=device)], scale=1.0)
