import os
import signal
from collections import Counter

import torch

# Triton kernels run on CPU tensors through the interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A suite started in the background by a script (`cmd &`) inherits SIGINT ignored, and so would every command
# it starts; the Ctrl-C tests need Python's own handler, as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
from helpers import DEVICES, IMPLS_UNDER_TEST, KERNEL_IMPLS_UNDER_TEST, impl_skip_reason  # noqa: E402


# `pytest -m gpu` (benchmarks/gpu_suite.sh) selects every test that runs on the GPU
@pytest.fixture(params=[pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES])
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=KERNEL_IMPLS_UNDER_TEST)
def impl(request, device):
    """A backend whose kernel table runs against the reference on ``device``."""
    reason = impl_skip_reason(request.param, device)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=["reference", *IMPLS_UNDER_TEST])
def impl_any(request):
    """Every backend, the reference included, on the CPU."""
    reason = impl_skip_reason(request.param, "cpu")
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run fastest that way, and two threads thrash on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    """Why tests were skipped: one line per reason with its count, so a run says what it did not cover here."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr  # (file, line, reason) for a skip
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section(f"{sum(reasons.values())} skipped, by reason", sep="-")
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:6d}  {reason}")
