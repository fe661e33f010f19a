"""pytest-benchmark: Fisher accumulation F += g^2 / batches, every backend against the baselines."""

import pytest

from benchmarks.ops import OPS

FAMILY_OPS = [name for name, spec in OPS.items() if spec.family == "fisher_accumulate"]


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_fisher_accumulate(run_op, op, case_name, dtype_name, contender_name):
    run_op(op, case_name, dtype_name, contender_name)
