"""pytest-benchmark: the slow-weight sync at a = 0.5 and a = 1, every backend against the baselines."""

import pytest

from benchmarks.ops import OPS

FAMILY_OPS = [name for name, spec in OPS.items() if spec.family == "slow_sync"]


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_slow_sync(run_op, op, case_name, dtype_name, contender_name):
    run_op(op, case_name, dtype_name, contender_name)
