"""pytest-benchmark: one SFR-on iteration of a CIFAR ResNet-18 (forget + remain step, forward and backward).

``SFRon`` with every available backend against the stock-PyTorch loop, the
official loop and the forward/backward passes alone (see :mod:`benchmarks.e2e`).
"""

import pytest
import torch

from benchmarks import e2e, suite


def _names(device):
    ours = [c.name for c in suite.contenders(device)[0] if c.kind == "ours"]
    return ours, list(e2e.builders(ours))


@pytest.mark.parametrize("name", _names("cuda" if torch.cuda.is_available() else "cpu")[1])
def test_sfron_iteration(benchmark, request, bench_device, name):
    ours, names = _names(bench_device)
    if name not in names:
        pytest.skip(f"{name} is not available on {bench_device}")
    cuda = torch.device(bench_device).type == "cuda"
    batch = request.config.getoption("--bench-batch") or (128 if cuda else 16)
    iteration = e2e.builders(ours)[name](bench_device, batch)

    def call():
        iteration()
        if cuda:
            torch.cuda.synchronize()

    benchmark.pedantic(call, warmup_rounds=1, rounds=max(3, request.config.getoption("--bench-rounds") // 2),
                       iterations=1)
    benchmark.extra_info.update(contender=name, batch=batch)
