"""pytest-benchmark: the masked squared norm (the clip's first pass), every backend against the baselines."""

import pytest

from benchmarks.ops import OPS

FAMILY_OPS = [name for name, spec in OPS.items() if spec.family == "masked_norm"]


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_masked_norm(run_op, op, case_name, dtype_name, contender_name):
    run_op(op, case_name, dtype_name, contender_name)
