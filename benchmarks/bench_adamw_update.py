"""pytest-benchmark: the AdamW forget step (mask + clip), every backend against the baselines."""

import pytest

from benchmarks.ops import OPS

FAMILY_OPS = [name for name, spec in OPS.items() if spec.family == "adamw_update"]


@pytest.mark.parametrize("op", FAMILY_OPS)
def test_adamw_update(run_op, op, case_name, dtype_name, contender_name):
    run_op(op, case_name, dtype_name, contender_name)
