"""Shared test helpers: devices, backends under test, input matrices, tolerances."""

from __future__ import annotations

import os

import cuda_emulation
import pytest
import torch

from sfron_ops import _impl, reference
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
# The inputs of the kernel suites (tests/test_<stem>.py), one builder for every op family and backend: fresh random
# tensors over the sizes, dtypes and masks the kernels must all handle.
#: 0 and 1 elements, small odd, around the chunk borders (4096: Triton; 16384: CPU, CUDA and Triton's norm) and above
#: 65,536
SIZES = [0, 1, 7, 22, 4097, 16384, 16385, 70000]
#: no mask; all-zero bool; all-one uint8; random bool and uint8; random floats in the tensors' dtype and in float64;
#: packed bits
MASK_KINDS = ["none", "zeros", "ones", "random", "uint8", "float", "f64", "packed"]
#: an update without norm_state, clipped by one, and skipped by its non-finite flag
NORM_MODES = ["none", "clip", "skip"]


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def shapes_for(case: str):
    """'sizes': one tensor per edge size, a 3-d and an empty 3-d one; 'many': 120 small odd tensors."""
    if case == "sizes":
        return [(n,) for n in SIZES] + [(3, 7, 5), (2, 0, 3)]
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
    if kind in ("random", "uint8"):
        dtype = torch.bool if kind == "random" else torch.uint8
        return [(torch.rand(s, device=device) < 0.5).to(dtype) for s in shapes], False
    if kind in ("float", "f64"):
        dtype = param_dtype if kind == "float" else torch.float64
        return [torch.rand(s, device=device).to(dtype) for s in shapes], False
    if kind == "packed":
        return [pack_mask(torch.rand(s, device=device) < 0.5) for s in shapes], True
    raise ValueError(kind)


def norm_state_for(mode: str, grads, masks, packed: bool, alpha: float, device):
    """None, the reference's norm state of the direction (to clip by), or one whose non-finite flag is set."""
    if mode == "none":
        return None
    state = torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, state, alpha=alpha, packed_masks=packed)
    if mode == "skip":
        state[1] = 1.0
    return state


def update_inputs(case: str, mask_kind: str, dtype, device, norm: str, hypers: list, scale: float):
    """The inputs of an update op's comparison with the reference: (hyperparameters, params, grads, masks, packed,
    steps, norm_state). The hyperparameter sets rotate with the mask kind and case, so each meets every dtype and
    norm mode; norm_state is that of the direction scale * (g * m)."""
    shapes = shapes_for(case)
    hyper = hypers[(MASK_KINDS.index(mask_kind) + 2 * (case == "many")) % len(hypers)]
    params, grads = make(shapes, dtype, device), make(shapes, dtype, device)
    masks, packed = make_masks(mask_kind, shapes, device, dtype)
    norm_state = norm_state_for(norm, grads, masks, packed, abs(scale), device)
    return hyper, params, grads, masks, packed, steps_for(shapes, device), norm_state


def update_matrix(test):
    """Parametrises an update op's comparison over every dtype, mask kind, case and norm mode."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)(test)
    test = pytest.mark.parametrize("mask_kind", MASK_KINDS)(test)
    test = pytest.mark.parametrize("case", ["sizes", "many"])(test)
    return pytest.mark.parametrize("norm", NORM_MODES)(test)


def flagged_step(impl: str, device):
    """(params, grads, norm_state) where one gradient is NaN and the backend's own norm has flagged it."""
    shapes = [(4099,), (5,)]
    params, grads = make(shapes, torch.float32, device), make(shapes, torch.float32, device)
    grads[1][2] = float("nan")
    state = torch.zeros(2, device=device)
    kernels(impl)["masked_norm"](grads, [], state, alpha=1.0)
    assert state[1].item() == 1.0
    return params, grads, state


def odd_layouts(device):
    """Tensors that are not contiguous: transposed, channels_last, strided slices, a storage offset."""
    return [
        torch.randn(6, 5, device=device).t(),
        torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last),
        torch.randn(40, device=device)[::3],
        torch.randn(16384 + 9, device=device)[1:],
    ]


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_lists_close(actual, expected, what="", **kw):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i, e=e: f"{what}[{i}] (shape {tuple(e.shape)}): {m}", **kw)


def steps_for(shapes, device, started=(0, 3)):
    """Step counters: alternately fresh (0) and already running, so first-step paths are covered."""
    return [torch.tensor(float(started[i % len(started)]), device=device) for i in range(len(shapes))]
