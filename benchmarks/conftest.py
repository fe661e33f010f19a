"""pytest-benchmark microbenchmarks of every op, backend and baseline.

    pytest benchmarks [--bench-device cuda] [--bench-cases resnet18_cifar,ragged] [--bench-dtypes fp32]
                      [--bench-contenders foreach,torch] [--bench-rounds 20] [--bench-mode full]

The files are ``bench_<family>.py`` (collected by the hook below), one per
kernel family, and ``bench_optimizer_step.py`` for the end-to-end iteration.
``python -m benchmarks.run`` measures the same things with CUDA events, cache
flushes, the byte model and peak memory; these tests are the quick, familiar
pytest-benchmark view. The timed function synchronises the device, because
kernel launches are asynchronous.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import cases, suite
from benchmarks.ops import OPS


def pytest_addoption(parser):
    group = parser.getgroup("sfron_ops benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-mode", default="quick", choices=("full", "quick", "smoke"), help="case sizes")
    group.addoption("--bench-cases", default="resnet18_cifar,many_tiny,ragged", help="comma-separated cases")
    group.addoption("--bench-dtypes", default="fp32,bf16", help="comma-separated parameter dtypes")
    group.addoption("--bench-contenders", default="", help="comma-separated contenders (default: all)")
    group.addoption("--bench-rounds", type=int, default=10, help="timed rounds per benchmark")
    group.addoption("--bench-batch", type=int, default=None, help="end-to-end batch (default: 128 CUDA, 16 CPU)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _csv(config, name):
    return [s for s in (config.getoption(name) or "").split(",") if s]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = _device(config)
    if "case_name" in metafunc.fixturenames:
        metafunc.parametrize("case_name", _csv(config, "--bench-cases"))
    if "dtype_name" in metafunc.fixturenames:
        metafunc.parametrize("dtype_name", _csv(config, "--bench-dtypes"))
    if "contender_name" in metafunc.fixturenames:
        names = [c.name for c in suite.contenders(device, _csv(config, "--bench-contenders") or None)[0]]
        metafunc.parametrize("contender_name", names)


@functools.lru_cache(maxsize=None)
def _case(name, device, mode):
    return cases.build_case(name, device, mode)


@pytest.fixture
def bench_device(request) -> str:
    return _device(request.config)


@pytest.fixture
def run_op(benchmark, request, bench_device):
    """``run_op(op, case, dtype, contender)``: benchmark one call of a contender on a case."""
    config = request.config
    cuda = torch.device(bench_device).type == "cuda"

    def run(op, case_name, dtype_name, contender_name):
        spec = OPS[op]
        if dtype_name not in spec.dtypes:
            pytest.skip(f"{op} has no {dtype_name} variant")
        case = _case(case_name, bench_device, config.getoption("--bench-mode"))
        dtype = cases.DTYPES[dtype_name]
        state = cases.make_state(case, dtype, bench_device, spec.needs)
        contender = next(c for c in suite.contenders(bench_device)[0] if c.name == contender_name)
        with torch.no_grad():
            runner = contender.build(op, state)

            def call():
                runner.step()
                if cuda:
                    torch.cuda.synchronize()

            benchmark.pedantic(call, warmup_rounds=1, rounds=config.getoption("--bench-rounds"), iterations=1)
        median = benchmark.stats.stats.median
        modelled = spec.modelled_bytes(case.numel, dtype)
        benchmark.extra_info.update(case=case_name, dtype=dtype_name, contender=contender_name, op=op,
                                    note=runner.note, modelled_bytes=modelled, gbs=modelled / median / 1e9)
        runner = state = None  # free the tensors before the next benchmark builds its own
        suite.release(bench_device, case.numel)

    return run
