"""pytest-benchmark: the SGD forget steps (plain, clip, clip + momentum + weight decay) and the remain step.

Every backend against the baselines.
"""

import pytest

from benchmarks.ops import OPS

FAMILY_OPS = [name for name, spec in OPS.items() if spec.family == "sgd_update"]


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_sgd_update(run_op, op, case_name, dtype_name, contender_name):
    run_op(op, case_name, dtype_name, contender_name)
