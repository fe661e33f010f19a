"""Shared test helpers: devices, backends under test, input matrices, tolerances."""

from __future__ import annotations

import os

import cuda_emulation
import pytest
import torch

from sfron_ops import _impl
from sfron_ops.reference import pack_mask

DEVICES = [d for d in os.environ.get("SFRON_OPS_TEST_DEVICES", "cpu,cuda").split(",")
           if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]

#: the package's backends compared against the reference
IMPLS_UNDER_TEST = ["foreach", "fused", "triton"]

#: csrc/cuda compiled for the CPU and run under tests/cuda_emulation: the kernel suites run it too
EMULATED_CUDA = "cuda_emulated"
KERNEL_IMPLS_UNDER_TEST = [*IMPLS_UNDER_TEST, EMULATED_CUDA]

#: backends that must be present (e.g. in CI): a missing one fails instead of skipping
REQUIRED_IMPLS = [s for s in os.environ.get("SFRON_OPS_REQUIRE_IMPLS", "").split(",") if s]


def impl_skip_reason(impl: str, device) -> str | None:
    if impl == EMULATED_CUDA:
        if torch.device(device).type != "cpu":
            return "the CUDA emulation runs on CPU tensors"  # a skip even where the emulation is required
        reason = cuda_emulation.why_unavailable(device)
    else:
        reason = _impl.why_unavailable(impl, device)
    if reason is not None and impl in REQUIRED_IMPLS:
        pytest.fail(f"impl={impl!r} is required (SFRON_OPS_REQUIRE_IMPLS) but unavailable on {device}: {reason}")
    return reason


def kernels(impl: str) -> dict:
    """The kernel table of a backend under test (the package's, or the emulated CUDA kernels)."""
    if impl == EMULATED_CUDA:
        return cuda_emulation.kernels()
    return _impl.kernels(impl)


def emulate_cuda_as_fused(monkeypatch) -> dict:
    """Make ``impl="fused"`` run csrc/cuda under the emulation on CPU tensors; the emulated kernel table."""
    reason = impl_skip_reason(EMULATED_CUDA, "cpu")
    if reason is not None:
        pytest.skip(reason)
    emulated = kernels(EMULATED_CUDA)
    package_kernels = _impl.kernels
    monkeypatch.setattr(_impl, "kernels", lambda impl: emulated if impl == "fused" else package_kernels(impl))
    return emulated


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 22, 4097, 70000]
MASK_KINDS = ["none", "zeros", "ones", "random", "float", "packed"]


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def shapes_for(case: str):
    """'sizes': one tensor per edge size (0, 1, odd, > 65,536 elements); 'many': 120 small odd tensors."""
    if case == "sizes":
        return [(n,) for n in SIZES] + [(3, 7, 5)]
    if case == "many":
        return [(1 + (7 * i) % 29, 3) if i % 3 else (2 * i + 1,) for i in range(120)]
    raise ValueError(case)


def make(shapes, dtype, device, low=-1.0, high=1.0):
    return [(torch.rand(s, device=device) * (high - low) + low).to(dtype) for s in shapes]


def make_masks(kind: str, shapes, device, param_dtype=torch.float32):
    """Masks of a kind for the given shapes, and whether they are packed."""
    if kind == "none":
        return [], False
    if kind == "zeros":
        return [torch.zeros(s, dtype=torch.bool, device=device) for s in shapes], False
    if kind == "ones":
        return [torch.ones(s, dtype=torch.uint8, device=device) for s in shapes], False
    if kind == "random":
        return [torch.rand(s, device=device) < 0.5 for s in shapes], False
    if kind == "float":
        return [torch.rand(s, device=device).to(param_dtype) for s in shapes], False
    if kind == "packed":
        return [pack_mask(torch.rand(s, device=device) < 0.5) for s in shapes], True
    raise ValueError(kind)


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_lists_close(actual, expected, what="", **kw):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m: f"{what}[{i}] (shape {tuple(e.shape)}): {m}", **kw)


def steps_for(shapes, device, started=(0, 3)):
    """Step counters: alternately fresh (0) and already running, so first-step paths are covered."""
    return [torch.tensor(float(started[i % len(started)]), device=device) for i in range(len(shapes))]
