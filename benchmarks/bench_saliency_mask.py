"""pytest-benchmark: the saliency mask from two Fisher diagonals, every backend against the baselines."""

import pytest

from benchmarks.ops import OPS

FAMILY_OPS = [name for name, spec in OPS.items() if spec.family == "saliency_mask"]


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_saliency_mask(run_op, op, case_name, dtype_name, contender_name):
    run_op(op, case_name, dtype_name, contender_name)
